//! Multi-call binary for `mkfs.tandem`, `mount.tandem` and `fsck.tandem`, chosen by the
//! name it is invoked as (or by the first argument: `tandemfs mkfs ...`).

use std::path::Path;
use std::process::ExitCode;

mod fsck;
mod mkfs;
mod mount;
mod mount_cluster;
mod readahead;
mod target;

fn main() -> ExitCode {
    // fuser warns about its own second unmount attempt after every clean unmount.
    tandem_common::logging::init("warn,fuser=error");
    let mut args: Vec<String> = std::env::args().collect();
    let mut tool = args
        .first()
        .map(|a| {
            Path::new(a)
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    if !tool.ends_with(".tandem") {
        if args.len() < 2 {
            eprintln!("usage: tandemfs {{mkfs|mount|fsck}} ARGS...  (or run it as mkfs.tandem, mount.tandem, fsck.tandem)");
            return ExitCode::from(2);
        }
        args.remove(0);
        tool = args[0].trim_end_matches(".tandem").to_string() + ".tandem";
    }
    match tool.as_str() {
        "mkfs.tandem" => mkfs::main(args),
        "mount.tandem" => mount::main(args),
        "fsck.tandem" => fsck::main(args),
        other => {
            eprintln!("tandemfs: unknown tool {other:?}; expected mkfs, mount or fsck");
            ExitCode::from(2)
        }
    }
}
