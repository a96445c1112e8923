//! A cluster filesystem test bed: N nodes in network namespaces, each running
//! tandem-lockd and tandem-replicatord (one dual-primary resource), a `lock_tandem`
//! filesystem made on it, and `mount.tandem` on chosen nodes at `/var/www/html` inside
//! each node's private mount namespace. Tests reach a node's mount through an `NsWorker`.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{bin, Cluster, Faults, NsWorker, ResourceSpec};

pub const MNT: &str = "/var/www/html";
pub const RES: &str = "www";

/// Makes the filesystem on node 0's export of the volume (`-J 4`, `journals` journals).
pub fn mkfs(c: &Cluster, lockproto: &str, journals: usize) -> anyhow::Result<()> {
    let j = journals.to_string();
    let out = Command::new(bin("tandemfs"))
        .args([
            "mkfs", "-q", "-t", "test:www", "-p", lockproto, "-j", &j, "-J", "4",
        ])
        .arg(c.nbd_uri(0, RES))
        .output()?;
    if !out.status.success() {
        bail!("mkfs failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Starts `tandemfs mount` of node `node`'s export at `MNT` in its own mount namespace
/// (foreground, tracked by PID, `extra` arguments appended) and waits for the FUSE mount.
pub fn spawn_mount(c: &mut Cluster, node: usize, extra: &[&str]) -> anyhow::Result<u32> {
    std::fs::create_dir_all(MNT)?;
    let uri = c.nbd_uri(node, RES);
    let mut args = vec!["mount", uri.as_str(), MNT, "-f"];
    args.extend_from_slice(extra);
    let pid = c.spawn(node, "fs", &bin("tandemfs"), &args)?;
    c.wait_for(Duration::from_secs(30), || {
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        Ok(info
            .lines()
            .any(|l| l.contains(&format!(" {MNT} ")) && l.contains(" - fuse")))
    })
    .with_context(|| {
        format!(
            "mount on n{} did not appear:\n{}",
            node + 1,
            c.log(node, "fs")
        )
    })?;
    Ok(pid)
}

/// Unmounts node `node`'s mount through its worker (umount inside its namespace) and
/// waits until the mount daemon `pid` has exited.
pub fn unmount(c: &Cluster, node: usize, w: NsWorker, pid: u32) -> anyhow::Result<()> {
    let ok = w.run(|| {
        let p = std::ffi::CString::new(MNT).unwrap();
        // SAFETY: plain umount2 of a path in this thread's namespace.
        unsafe { libc::umount2(p.as_ptr(), 0) == 0 }
    });
    drop(w);
    if !ok {
        bail!("umount on n{} failed", node + 1);
    }
    c.wait_for(Duration::from_secs(30), || {
        Ok(!std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true))
    })
}

/// `fsck.tandem -n` (exit 0 = clean) through node `node`'s export: (clean, report).
pub fn fsck(c: &Cluster, node: usize) -> anyhow::Result<(bool, String)> {
    let out = Command::new(bin("tandemfs"))
        .args(["fsck", "-n"])
        .arg(c.nbd_uri(node, RES))
        .output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text += &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

pub struct FsCluster {
    // Declared first so it drops first: killing the mounts unblocks any stuck worker.
    pub c: Cluster,
    pub workers: Vec<Option<NsWorker>>,
    pids: Vec<Option<u32>>,
}

impl FsCluster {
    /// Starts `nodes` nodes (lockd + replicator, all Primary) and makes the filesystem
    /// with one journal per node (plus `spare_journals`).
    pub fn start(nodes: usize, spare_journals: usize) -> anyhow::Result<Self> {
        Self::start_with_faults(nodes, spare_journals, None)
    }

    /// `start`, with every node's network impaired before any daemon connects.
    pub fn start_with_faults(
        nodes: usize,
        spare_journals: usize,
        faults: Option<Faults>,
    ) -> anyhow::Result<Self> {
        Self::start_with(nodes, spare_journals, faults, "")
    }

    /// `start_with_faults`, with `extra` lines for the replicated resource's section.
    pub fn start_with(
        nodes: usize,
        spare_journals: usize,
        faults: Option<Faults>,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let mut c = Cluster::builder()
            .nodes(nodes)
            .resource(ResourceSpec {
                name: RES.into(),
                size: "128MiB".into(),
                // As a cluster filesystem should run from three nodes on: a node cut off
                // fails its writes instead of writing a split brain.
                extra: if nodes >= 3 {
                    format!("quorum = \"majority\"\non-no-quorum = \"io-error\"\n{extra}")
                } else {
                    extra.to_owned()
                },
                ..Default::default()
            })
            .start()?;
        if let Some(f) = faults {
            for i in 0..nodes {
                c.impair_network(i, f)?;
            }
        }
        for i in 0..nodes {
            c.start_lockd(i)?;
        }
        c.bring_up_fresh(RES)?;
        for i in 1..nodes {
            c.adm(i, &["primary", RES])?;
        }
        c.wait_for(Duration::from_secs(30), || {
            Ok((0..nodes).all(|i| {
                c.lockctl_status(i)
                    .is_some_and(|s| s["leader"].as_u64().unwrap_or(0) != 0)
            }))
        })
        .context("the lock managers elected no leader")?;
        mkfs(&c, "lock_tandem", nodes + spare_journals)?;
        Ok(Self {
            c,
            workers: (0..nodes).map(|_| None).collect(),
            pids: vec![None; nodes],
        })
    }

    /// Mounts the filesystem on node `i` (foreground daemon, tracked by PID).
    pub fn mount(&mut self, i: usize) -> anyhow::Result<()> {
        self.mount_with(i, "")
    }

    /// `mount`, with extra mount options (`extra`, comma-separated) after the node's.
    pub fn mount_with(&mut self, i: usize, extra: &str) -> anyhow::Result<()> {
        let opts = format!(
            "node={},config={}{}{}",
            self.c.node_name(i),
            self.c.config_path(i).display(),
            if extra.is_empty() {
                String::new()
            } else {
                format!(",{extra}")
            },
            std::env::var("TANDEM_FS_MOUNT_EXTRA")
                .map(|s| format!(",{s}"))
                .unwrap_or_default()
        );
        let pid = spawn_mount(&mut self.c, i, &["-o", &opts])?;
        self.workers[i] = Some(NsWorker::enter(pid)?);
        self.pids[i] = Some(pid);
        Ok(())
    }

    /// Clean unmount of node `i` (umount inside its namespace; the daemon exits).
    pub fn unmount(&mut self, i: usize) -> anyhow::Result<()> {
        let w = self.workers[i].take().context("not mounted")?;
        let pid = self.pids[i].take().expect("pid of a mount");
        unmount(&self.c, i, w, pid)
    }

    /// `start(nodes, 0)` and every node mounted.
    pub fn start_mounted(nodes: usize) -> anyhow::Result<Self> {
        let mut f = Self::start(nodes, 0)?;
        for i in 0..nodes {
            f.mount(i)?;
        }
        Ok(f)
    }

    /// Unmounts the nodes that are still mounted, then runs `fsck -n`: panics with its
    /// report (and `what`) unless the filesystem is clean.
    pub fn unmount_all_and_check_clean(&mut self, what: &str) {
        for i in 0..self.workers.len() {
            if self.workers[i].is_some() {
                self.unmount(i)
                    .unwrap_or_else(|e| panic!("unmount n{}: {e}", i + 1));
            }
        }
        let (clean, text) = self.fsck().expect("run fsck");
        assert!(clean, "fsck {what}: {text}");
    }

    pub fn w(&self, i: usize) -> &NsWorker {
        self.workers[i].as_ref().expect("node is mounted")
    }

    /// Runs `fsck.tandem -n` (exit 0 = clean) on node 0's export.
    pub fn fsck(&self) -> anyhow::Result<(bool, String)> {
        fsck(&self.c, 0)
    }
}
