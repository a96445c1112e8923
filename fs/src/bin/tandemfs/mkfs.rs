//! `mkfs.tandem`: makes a Tandem filesystem on an image file, block device or NBD export.

use std::fs::OpenOptions;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tandem_fs::format::LockProto;
use tandem_fs::mkfs::{mkfs, validate_lock_table, MkfsOptions};

#[derive(Parser, Debug)]
#[command(
    name = "mkfs.tandem",
    version,
    about = "Make a Tandem shared filesystem"
)]
struct Args {
    /// Lock table: CLUSTER:FSNAME (fsname is 1-16 characters).
    #[arg(short = 't', value_name = "CLUSTER:FSNAME")]
    lock_table: String,
    /// Number of journals: one per node that will mount the filesystem.
    #[arg(short = 'j', default_value_t = 1)]
    journals: u32,
    /// Size of each journal in MiB (default: 32, or less on small devices).
    #[arg(short = 'J', value_name = "MB")]
    journal_mib: Option<u64>,
    /// Block size in bytes.
    #[arg(short = 'b', default_value_t = 4096)]
    block_size: u32,
    /// Lock protocol: lock_tandem (cluster) or lock_nolock (single node).
    #[arg(short = 'p', default_value = "lock_tandem")]
    lock_proto: String,
    /// Create or resize TARGET as an image file of this size first (e.g. 1G).
    #[arg(short = 's', long = "size")]
    size: Option<String>,
    /// Do not print the summary.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file, block device, or nbd+unix:///EXPORT?socket=PATH.
    target: String,
}

fn run(a: Args) -> anyhow::Result<()> {
    validate_lock_table(&a.lock_table).map_err(anyhow::Error::msg)?;
    let lock_proto = LockProto::parse(&a.lock_proto).with_context(|| {
        format!(
            "unknown lock protocol {:?} (use lock_tandem or lock_nolock)",
            a.lock_proto
        )
    })?;
    if a.size.is_some() && a.target.starts_with("nbd") {
        anyhow::bail!("-s creates image files; an NBD export has the size its server gives it");
    }
    if let Some(size) = &a.size {
        let bytes = tandem_common::size::parse_size_bytes(size).map_err(anyhow::Error::msg)?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&a.target)
            .with_context(|| format!("cannot create {}", a.target))?;
        f.set_len(bytes)
            .with_context(|| format!("cannot size {}", a.target))?;
    }
    let dev = crate::target::open_target(&a.target, true)?;
    let opts = MkfsOptions {
        lock_table: a.lock_table,
        journals: a.journals,
        journal_mib: a.journal_mib,
        block_size: a.block_size,
        lock_proto,
    };
    let sb = mkfs(dev, &opts).with_context(|| format!("mkfs on {} failed", a.target))?;
    if !a.quiet {
        let uuid: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
        println!("Device:            {}", a.target);
        println!("Block size:        {}", sb.block_size);
        println!(
            "Device size:       {:.2} GB ({} blocks)",
            (sb.block_count * u64::from(sb.block_size)) as f64 / 1e9,
            sb.block_count
        );
        println!(
            "Filesystem size:   {} blocks in {} resource groups",
            sb.block_count - sb.rg_start,
            sb.rg_count
        );
        println!(
            "Journals:          {} x {} MB",
            sb.journal_count,
            (u64::from(sb.journal_blocks) * u64::from(sb.block_size)) >> 20
        );
        println!("Locking protocol:  {}", sb.lock_proto.as_str());
        println!("Lock table:        {}", sb.lock_table);
        println!("UUID:              {uuid}");
    }
    Ok(())
}

pub fn main(args: Vec<String>) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mkfs.tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}
