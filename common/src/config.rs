//! `/etc/tandem/cluster.toml`: nodes, resources and the lock manager, shared by every daemon
//! and CLI. Documented with a full example in `docs/CONFIG.md`.
//!
//! Parsing is strict: unknown keys are errors, and every validation error names the key
//! (`resource.www.protocol`) so the operator knows what to fix.

use crate::ids::NodeId;
use crate::size::parse_size_bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tandem/cluster.toml";
pub const DEFAULT_REPLICATION_PORT: u16 = 7788;
pub const DEFAULT_LOCK_PORT: u16 = 7790;
/// DRBD allows 32 nodes per resource; we cap at 16 (bitmap slots are preallocated).
pub const MAX_NODES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}` is invalid: {message}")]
    Invalid { key: String, message: String },
    #[error("node `{0}` is not defined in the config (known nodes: {1})")]
    UnknownNode(String, String),
    #[error("resource `{0}` is not defined in the config (known resources: {1})")]
    UnknownResource(String, String),
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Replication protocol, as DRBD names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Protocol {
    /// Complete after the local write and the data is queued for every peer.
    A,
    /// Complete after the local write and every peer has received the data.
    B,
    /// Complete after the local write and every peer has written the data (default).
    #[default]
    C,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IoEngine {
    /// io_uring, falling back to pread/pwrite when the kernel refuses a ring.
    #[default]
    Uring,
    /// Plain pread/pwrite on a thread pool.
    Posix,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterSection {
    /// Cluster name; the filesystem's lock table name is `CLUSTER:FSNAME`.
    pub name: String,
    /// Shared secret for peer authentication (replication and lock manager).
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the shared secret (first line), instead of `secret`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Per-node state lives in `<state-dir>/<node>`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Per-node sockets live in `<run-dir>/<node>`.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tandem")
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/tandem")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    pub name: String,
    pub id: u8,
    /// IP address other nodes use to reach this node.
    pub address: IpAddr,
    #[serde(default = "default_replication_port")]
    pub replication_port: u16,
    #[serde(default = "default_lock_port")]
    pub lock_port: u16,
    /// A witness runs only the lock manager as a diskless voter (a tiebreaker).
    #[serde(default)]
    pub witness: bool,
}

fn default_replication_port() -> u16 {
    DEFAULT_REPLICATION_PORT
}
fn default_lock_port() -> u16 {
    DEFAULT_LOCK_PORT
}

impl NodeConfig {
    pub fn node_id(&self) -> NodeId {
        NodeId(self.id)
    }
    pub fn replication_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.replication_port)
    }
    pub fn lock_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.lock_port)
    }
}

/// Per-node settings of one resource (DRBD's `on HOST { disk …; meta-disk …; }`).
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResourceOnNode {
    /// Backing disk: a regular file, loop device or block device. Absent = diskless node.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// `internal` (default) or a path to an external metadata file/device.
    #[serde(default)]
    pub meta_disk: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResourceConfig {
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// Size of the replicated volume; file-backed disks are created with this size
    /// (plus metadata) by `create-md` when missing. Defaults to the backing disk's size.
    #[serde(default)]
    pub size: Option<String>,
    /// Overrides the cluster secret for this resource's replication links.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Nodes taking part; defaults to every non-witness node.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// Per-node disks, keyed by node name.
    #[serde(default)]
    pub on: BTreeMap<String, ResourceOnNode>,
    /// Full-sync rate limit in bytes/s ("100MiB"); absent = unlimited.
    #[serde(default)]
    pub resync_rate: Option<String>,
    /// Dynamic resync control (DRBD's c-fill-target): resync data kept in flight; halved
    /// while application writes are active so they keep their latency. Default 16MiB.
    #[serde(default)]
    pub resync_fill_target: Option<String>,
    /// `off` (default), `majority`, `all`, or a number of nodes (as a string or integer).
    #[serde(default)]
    pub quorum: Option<toml::Value>,
    /// What a Primary without quorum does with writes: `io-error` or `suspend-io`.
    #[serde(default)]
    pub on_no_quorum: OnNoQuorum,
    /// What a local disk error does: `detach` (default: continue Diskless through peers)
    /// or `pass-on` (report the error to the application).
    #[serde(default)]
    pub on_io_error: OnIoError,
    /// Automatic split-brain recovery when neither node is Primary.
    #[serde(default)]
    pub after_sb_0pri: AfterSb0Pri,
    /// ... when one node is Primary.
    #[serde(default)]
    pub after_sb_1pri: AfterSb1Pri,
    /// ... when both are Primary (only `disconnect`: a human must decide).
    #[serde(default)]
    pub after_sb_2pri: AfterSb2Pri,
    /// Command run on split brain, with TANDEM_RESOURCE and TANDEM_PEER set.
    #[serde(default)]
    pub split_brain_handler: Option<String>,
}

/// DRBD's `on-io-error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnIoError {
    /// Drop the failed disk and keep serving I/O through UpToDate peers.
    #[default]
    Detach,
    /// Return the error to the application; the disk state becomes Failed.
    PassOn,
}

/// DRBD's `after-sb-0pri`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSb0Pri {
    #[default]
    Disconnect,
    /// The side without changes since the split is overwritten.
    DiscardZeroChanges,
    /// The side with fewer changed blocks is overwritten (tie: higher node id loses).
    DiscardLeastChanges,
    /// The side that became Primary last is overwritten.
    DiscardYoungerPrimary,
    /// The side that became Primary first is overwritten.
    DiscardOlderPrimary,
}

/// DRBD's `after-sb-1pri`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSb1Pri {
    #[default]
    Disconnect,
    /// Apply the after-sb-0pri policy if it discards the Secondary, else disconnect.
    Consensus,
    /// The Secondary is overwritten.
    DiscardSecondary,
}

/// DRBD's `after-sb-2pri`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSb2Pri {
    #[default]
    Disconnect,
}

/// Quorum policy of a resource (DRBD's `quorum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quorum {
    #[default]
    Off,
    Majority,
    All,
    Nodes(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoQuorum {
    /// Fail writes with EIO (DRBD's io-error).
    #[default]
    IoError,
    /// Hold writes until quorum returns (DRBD's suspend-io).
    SuspendIo,
}

impl ResourceConfig {
    /// The quorum policy; validated at load time.
    pub fn quorum_policy(&self) -> Result<Quorum, String> {
        match &self.quorum {
            None => Ok(Quorum::Off),
            Some(toml::Value::String(s)) => match s.as_str() {
                "off" => Ok(Quorum::Off),
                "majority" => Ok(Quorum::Majority),
                "all" => Ok(Quorum::All),
                n => n
                    .parse::<u8>()
                    .map(Quorum::Nodes)
                    .map_err(|_| format!("{n:?} is not off, majority, all or a node count")),
            },
            Some(toml::Value::Integer(n)) if (1..=16).contains(n) => Ok(Quorum::Nodes(*n as u8)),
            Some(other) => Err(format!(
                "{other} is not off, majority, all or a node count 1..=16"
            )),
        }
    }
}

impl ResourceConfig {
    pub fn size_bytes(&self) -> Option<u64> {
        self.size.as_deref().and_then(|s| parse_size_bytes(s).ok())
    }
    pub fn resync_fill_target_bytes(&self) -> u64 {
        self.resync_fill_target
            .as_deref()
            .and_then(|s| parse_size_bytes(s).ok())
            .unwrap_or(16 << 20)
    }

    pub fn resync_rate_bytes_per_s(&self) -> Option<u64> {
        self.resync_rate
            .as_deref()
            .and_then(|s| parse_size_bytes(s).ok())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LockmgrSection {
    /// Raft tick interval.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Ticks without a heartbeat before a follower starts an election.
    #[serde(default = "default_election_ticks")]
    pub election_ticks: usize,
    #[serde(default = "default_heartbeat_ticks")]
    pub heartbeat_ticks: usize,
    /// Let a two-node cluster without a witness continue without fencing confirmation.
    #[serde(default)]
    pub allow_no_fencing: bool,
}

impl Default for LockmgrSection {
    fn default() -> Self {
        Self {
            tick_ms: default_tick_ms(),
            election_ticks: default_election_ticks(),
            heartbeat_ticks: default_heartbeat_ticks(),
            allow_no_fencing: false,
        }
    }
}

fn default_tick_ms() -> u64 {
    50
}
fn default_election_ticks() -> usize {
    10
}
fn default_heartbeat_ticks() -> usize {
    2
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
    #[serde(rename = "resource", default)]
    pub resources: Vec<ResourceConfig>,
    #[serde(default)]
    pub lockmgr: LockmgrSection,
}

impl ClusterConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_at(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse_at(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_at(text, Path::new("<config>"))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_name("cluster.name", &self.cluster.name)?;
        if self.cluster.secret.is_some() && self.cluster.secret_file.is_some() {
            return Err(invalid(
                "cluster.secret",
                "set either `secret` or `secret-file`, not both",
            ));
        }
        if let Some(secret) = &self.cluster.secret {
            if secret.len() < 8 {
                return Err(invalid(
                    "cluster.secret",
                    "the shared secret must be at least 8 characters",
                ));
            }
        }
        if self.nodes.is_empty() {
            return Err(invalid("node", "at least one [[node]] is required"));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(invalid(
                "node",
                format!("at most {MAX_NODES} nodes are supported"),
            ));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let key = format!("node[{i}]");
            validate_name(&format!("{key}.name"), &node.name)?;
            if node.id < NodeId::MIN {
                return Err(invalid(format!("node.{}.id", node.name), "must be 1..=255"));
            }
            for other in &self.nodes[..i] {
                if other.name == node.name {
                    return Err(invalid(
                        format!("node.{}.name", node.name),
                        "duplicate node name",
                    ));
                }
                if other.id == node.id {
                    return Err(invalid(
                        format!("node.{}.id", node.name),
                        format!("id {} is also used by node `{}`", node.id, other.name),
                    ));
                }
                if other.address == node.address
                    && (other.replication_port == node.replication_port
                        || other.lock_port == node.lock_port)
                {
                    return Err(invalid(
                        format!("node.{}.address", node.name),
                        format!("address and port clash with node `{}`", other.name),
                    ));
                }
            }
            if node.replication_port == node.lock_port {
                return Err(invalid(
                    format!("node.{}.lock-port", node.name),
                    "must differ from replication-port",
                ));
            }
        }
        for (i, res) in self.resources.iter().enumerate() {
            validate_name(&format!("resource[{i}].name"), &res.name)?;
            let key = format!("resource.{}", res.name);
            if self.resources[..i].iter().any(|r| r.name == res.name) {
                return Err(invalid(format!("{key}.name"), "duplicate resource name"));
            }
            if let Some(size) = &res.size {
                let bytes =
                    parse_size_bytes(size).map_err(|m| invalid(format!("{key}.size"), m))?;
                if bytes < 1 << 20 || !bytes.is_multiple_of(4096) {
                    return Err(invalid(
                        format!("{key}.size"),
                        "must be at least 1MiB and a multiple of 4KiB",
                    ));
                }
            }
            if let Some(fill) = &res.resync_fill_target {
                let b = parse_size_bytes(fill)
                    .map_err(|m| invalid(format!("{key}.resync-fill-target"), m))?;
                if b < 1 << 20 {
                    return Err(invalid(
                        format!("{key}.resync-fill-target"),
                        "must be at least 1MiB",
                    ));
                }
            }
            if let Some(rate) = &res.resync_rate {
                parse_size_bytes(rate).map_err(|m| invalid(format!("{key}.resync-rate"), m))?;
            }
            if let Some(secret) = &res.secret {
                if secret.len() < 8 {
                    return Err(invalid(
                        format!("{key}.secret"),
                        "the shared secret must be at least 8 characters",
                    ));
                }
            }
            let quorum = res
                .quorum_policy()
                .map_err(|m| invalid(format!("{key}.quorum"), m))?;
            if let Quorum::Nodes(n) = quorum {
                if n as usize > self.resource_node_names(res).len() || n == 0 {
                    return Err(invalid(
                        format!("{key}.quorum"),
                        format!("{n} is more than the resource's nodes"),
                    ));
                }
            }
            if res.allow_two_primaries && res.protocol != Protocol::C {
                return Err(invalid(
                    format!("{key}.allow-two-primaries"),
                    "dual-primary requires protocol C",
                ));
            }
            let members = self.resource_node_names(res);
            if members.is_empty() {
                return Err(invalid(format!("{key}.nodes"), "no nodes take part"));
            }
            for name in &members {
                let node = self.nodes.iter().find(|n| &n.name == name).ok_or_else(|| {
                    invalid(format!("{key}.nodes"), format!("unknown node `{name}`"))
                })?;
                // A witness may take part only as a diskless tiebreaker, listed by name.
                if node.witness && self.disk_for(res, name).is_some() {
                    return Err(invalid(
                        format!("{key}.on.{name}.disk"),
                        format!("node `{name}` is a witness and holds no disks; remove the disk to make it a diskless tiebreaker"),
                    ));
                }
            }
            if members.iter().all(|n| self.disk_for(res, n).is_none()) {
                return Err(invalid(
                    format!("{key}.on"),
                    "no member has a disk: set resource.on.NODE.disk on at least one node",
                ));
            }
            for (name, on) in &res.on {
                if !members.contains(name) {
                    return Err(invalid(
                        format!("{key}.on.{name}"),
                        "node is not a member of this resource",
                    ));
                }
                if let Some(meta) = &on.meta_disk {
                    if meta.is_empty() {
                        return Err(invalid(format!("{key}.on.{name}.meta-disk"), "empty"));
                    }
                    if on.disk.is_none() {
                        return Err(invalid(
                            format!("{key}.on.{name}.meta-disk"),
                            "a diskless node has no metadata: set disk too, or remove meta-disk",
                        ));
                    }
                }
            }
            if self.secret_for(res).is_none() {
                return Err(invalid(
                    "cluster.secret",
                    format!(
                        "resource `{}` has no shared secret: set cluster.secret, cluster.secret-file or resource.secret",
                        res.name
                    ),
                ));
            }
        }
        if self.lockmgr.tick_ms == 0 || self.lockmgr.tick_ms > 10_000 {
            return Err(invalid("lockmgr.tick-ms", "must be 1..=10000"));
        }
        if self.lockmgr.heartbeat_ticks == 0
            || self.lockmgr.election_ticks <= self.lockmgr.heartbeat_ticks
        {
            return Err(invalid(
                "lockmgr.election-ticks",
                "must be greater than heartbeat-ticks (> 0)",
            ));
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            ConfigError::UnknownNode(
                name.to_string(),
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
    }

    pub fn node_by_id(&self, id: NodeId) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id.0)
    }

    pub fn resource(&self, name: &str) -> Result<&ResourceConfig, ConfigError> {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| {
                ConfigError::UnknownResource(
                    name.to_string(),
                    self.resources
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
    }

    /// Names of the nodes taking part in a resource, in config order.
    pub fn resource_node_names(&self, res: &ResourceConfig) -> Vec<String> {
        match &res.nodes {
            Some(list) => list.clone(),
            None => self
                .nodes
                .iter()
                .filter(|n| !n.witness)
                .map(|n| n.name.clone())
                .collect(),
        }
    }

    /// Resolves the shared secret for a resource (resource override, else cluster secret).
    pub fn secret_for(&self, res: &ResourceConfig) -> Option<Vec<u8>> {
        if let Some(s) = &res.secret {
            return Some(s.as_bytes().to_vec());
        }
        self.cluster_secret()
    }

    /// The cluster-wide secret, from `secret` or the first line of `secret-file`.
    pub fn cluster_secret(&self) -> Option<Vec<u8>> {
        if let Some(s) = &self.cluster.secret {
            return Some(s.as_bytes().to_vec());
        }
        let path = self.cluster.secret_file.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        let line = text.lines().next()?.trim();
        (line.len() >= 8).then(|| line.as_bytes().to_vec())
    }

    /// `<state-dir>/<node>`: metadata, Raft log, default disk images.
    pub fn node_state_dir(&self, node: &str) -> PathBuf {
        self.cluster.state_dir.join(node)
    }

    /// `<run-dir>/<node>`: Unix sockets and pid files.
    pub fn node_run_dir(&self, node: &str) -> PathBuf {
        self.cluster.run_dir.join(node)
    }

    /// The replicator's control socket for a node (used by `tandemadm`).
    pub fn replicator_control_socket(&self, node: &str) -> PathBuf {
        self.node_run_dir(node).join("replicator.sock")
    }

    /// The NBD export of a resource on a node.
    pub fn nbd_socket(&self, node: &str, resource: &str) -> PathBuf {
        self.node_run_dir(node).join(format!("nbd-{resource}.sock"))
    }

    /// The lock manager's client socket for a node.
    pub fn lockd_socket(&self, node: &str) -> PathBuf {
        self.node_run_dir(node).join("lockd.sock")
    }

    /// A member without a disk: a diskless tiebreaker (votes for quorum, stores nothing).
    pub fn is_diskless(&self, res: &ResourceConfig, node: &str) -> bool {
        self.disk_for(res, node).is_none()
    }

    /// Backing disk of a resource on a node, if the node has one.
    pub fn disk_for(&self, res: &ResourceConfig, node: &str) -> Option<PathBuf> {
        res.on.get(node).and_then(|o| o.disk.clone())
    }

    /// `None` for internal metadata, else the external metadata path.
    pub fn external_meta_for(&self, res: &ResourceConfig, node: &str) -> Option<PathBuf> {
        match res.on.get(node).and_then(|o| o.meta_disk.as_deref()) {
            None | Some("internal") => None,
            Some(path) => Some(PathBuf::from(path)),
        }
    }
}

fn validate_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?} must be 1-63 characters of A-Z a-z 0-9 - _ ."),
        ))
    }
}

#[cfg(test)]
mod tests;
