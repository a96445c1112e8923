//! `fsck.tandem [-n|-y] TARGET`: checks a Tandem filesystem and repairs what it can.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tandem_fs::fsck::{fsck, FsckOptions};

#[derive(Parser, Debug)]
#[command(
    name = "fsck.tandem",
    version,
    about = "Check and repair a Tandem filesystem (unmounted on every node)"
)]
struct Args {
    /// Report only; change nothing (the default).
    #[arg(short = 'n', conflicts_with = "yes")]
    no: bool,
    /// Repair every problem found, replaying dirty journals first.
    #[arg(short = 'y')]
    yes: bool,
    /// Print progress lines even when stderr is not a terminal.
    #[arg(short = 'v')]
    verbose: bool,
    /// fsck(8) passes -a/-p for automatic repair; treated like -y.
    #[arg(short = 'a', short_alias = 'p', hide = true)]
    auto: bool,
    /// Image file, block device, or nbd+unix:///EXPORT?socket=PATH.
    target: String,
}

pub fn main(args: Vec<String>) -> ExitCode {
    let a = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(16)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let repair = a.yes || a.auto;
    let dev = match crate::target::open_target(&a.target, repair) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("fsck.tandem: {e:#}");
            return ExitCode::from(8);
        }
    };
    let chatty = a.verbose || std::io::stderr().is_terminal();
    let mut out = |line: &str| {
        if chatty || line.starts_with("problem") {
            eprintln!("fsck.tandem: {line}");
        }
    };
    match fsck(dev, FsckOptions { repair }, &mut out) {
        Ok(r) => {
            let state = match r.exit_code() {
                0 => "clean",
                1 => "errors corrected",
                _ => "ERRORS REMAIN (run with -y to repair)",
            };
            println!(
                "{}: {state}; {} problems, {} files, {} directories, {} blocks in use",
                a.target,
                r.problems.len(),
                r.files,
                r.dirs,
                r.used_blocks
            );
            ExitCode::from(r.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("fsck.tandem: {}: {e}", a.target);
            ExitCode::from(8)
        }
    }
}
