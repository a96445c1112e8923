//! `tandem-replicatord`: one process per node serving every resource that is up. It owns
//! the replication listener, the control socket and one NBD export per resource.

mod control_server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use parking_lot::Mutex;
use tandem_common::auth;
use tandem_common::ClusterConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::engine::Resource;
use crate::nbd;
use crate::peer;
use crate::proto::SERVICE;

struct UpResource {
    res: Arc<Resource>,
    tasks: Vec<JoinHandle<()>>,
    /// `None` on a diskless tiebreaker (nothing to export).
    nbd_socket: Option<PathBuf>,
}

pub struct Daemon {
    pub config: ClusterConfig,
    pub node: String,
    resources: Mutex<BTreeMap<String, UpResource>>,
    pub events: broadcast::Sender<String>,
}

impl Daemon {
    pub fn new(config: ClusterConfig, node: String) -> Arc<Self> {
        Arc::new(Self {
            config,
            node,
            resources: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(4096).0,
        })
    }

    pub fn resource(&self, name: &str) -> Option<Arc<Resource>> {
        self.resources.lock().get(name).map(|u| u.res.clone())
    }

    pub fn up_resources(&self) -> Vec<Arc<Resource>> {
        self.resources
            .lock()
            .values()
            .map(|u| u.res.clone())
            .collect()
    }

    /// Attaches a resource, starts its peer links and its NBD export.
    pub fn up(self: &Arc<Self>, name: &str) -> anyhow::Result<String> {
        if self.resources.lock().contains_key(name) {
            return Ok(format!("{name}: already up"));
        }
        let rc = self.config.resource(name)?.clone();
        let res = Resource::attach(&self.config, &rc, &self.node, self.events.clone())?;
        let mut tasks = Vec::new();
        let my_id = res.settings.node_id;
        for (peer, peer_name) in res.settings.peers.clone() {
            if my_id < peer {
                let addr = self.config.node(&peer_name)?.replication_addr();
                tasks.push(tokio::spawn(peer::dial_loop(res.clone(), peer, addr)));
            }
        }
        if res.settings.diskless {
            self.resources.lock().insert(
                name.to_string(),
                UpResource {
                    res,
                    tasks,
                    nbd_socket: None,
                },
            );
            self.knock_lower_peers(name);
            return Ok(format!(
                "{name}: up as a diskless tiebreaker (votes for quorum, no data, no NBD export)"
            ));
        }
        let socket = self.config.nbd_socket(&self.node, name);
        let listener = nbd::server::bind(&socket)
            .with_context(|| format!("cannot bind NBD socket {}", socket.display()))?;
        tasks.push(tokio::spawn(nbd::server::serve(
            listener,
            res.clone(),
            socket.clone(),
        )));
        self.resources.lock().insert(
            name.to_string(),
            UpResource {
                res,
                tasks,
                nbd_socket: Some(socket.clone()),
            },
        );
        self.knock_lower_peers(name);
        Ok(format!("{name}: up, NBD export at {}", socket.display()))
    }

    /// Once `name` accepts connections here, asks its lower-id peers to dial us now.
    fn knock_lower_peers(&self, name: &str) {
        let Some(res) = self.resource(name) else {
            return;
        };
        let my_id = res.settings.node_id;
        for (peer, peer_name) in res.settings.peers.clone() {
            if peer < my_id {
                if let Ok(node) = self.config.node(&peer_name) {
                    let addr = node.replication_addr();
                    tokio::spawn(peer::knock(res.clone(), peer, addr));
                }
            }
        }
    }

    /// Detaches a resource cleanly (demotes if Primary, syncs the disk).
    pub async fn down(&self, name: &str) -> anyhow::Result<String> {
        let up = self.resources.lock().remove(name);
        let Some(up) = up else {
            return Ok(format!("{name}: not up"));
        };
        for t in &up.tasks {
            t.abort();
        }
        up.res.detach_cleanly().await;
        if let Some(socket) = &up.nbd_socket {
            let _ = std::fs::remove_file(socket);
        }
        up.res.emit("destroy", "resource", "");
        Ok(format!("{name}: down"))
    }

    pub async fn down_all(&self) {
        let names: Vec<String> = self.resources.lock().keys().cloned().collect();
        for n in names {
            if let Err(e) = self.down(&n).await {
                tracing::error!(resource = %n, error = %e, "down failed");
            }
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(config: ClusterConfig, node: String, up: Vec<String>) -> anyhow::Result<()> {
    let me = config.node(&node)?.clone();
    let run_dir = config.node_run_dir(&node);
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
    let control_path = config.replicator_control_socket(&node);
    let daemon = Daemon::new(config, node.clone());
    let listener = TcpListener::bind(me.replication_addr())
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another tandem-replicatord for node {node} running, or is the address not configured on this host?)",
                me.replication_addr()
            )
        })?;
    let control = control_server::bind(&control_path)?;
    tracing::info!(%node, addr = %me.replication_addr(), control = %control_path.display(), "tandem-replicatord started");
    for name in up {
        match daemon.up(&name) {
            Ok(m) => tracing::info!("{m}"),
            Err(e) => tracing::error!(resource = %name, error = %e, "cannot bring resource up"),
        }
    }
    let accept = tokio::spawn(accept_loop(daemon.clone(), listener));
    let ctl = tokio::spawn(control_server::serve(daemon.clone(), control));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    accept.abort();
    ctl.abort();
    daemon.down_all().await;
    let _ = std::fs::remove_file(&control_path);
    Ok(())
}

async fn accept_loop(daemon: Arc<Daemon>, listener: TcpListener) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            match handle_incoming(daemon, stream).await {
                Err(auth::AuthError::Refused(r)) if r == peer::KNOCK_REPLY => {
                    tracing::info!(%addr, "a higher-id peer knocked: dialing it now");
                }
                Err(e) => tracing::warn!(%addr, reason = %e, "refused peer connection"),
                Ok(()) => {}
            }
        });
    }
}

async fn handle_incoming(
    daemon: Arc<Daemon>,
    mut stream: TcpStream,
) -> Result<(), auth::AuthError> {
    let _ = stream.set_nodelay(true);
    let my_id = daemon
        .config
        .node(&daemon.node)
        .map(|n| n.node_id())
        .unwrap_or_default();
    let mut chosen = None;
    let who = auth::accept(&mut stream, my_id, SERVICE, |hello| {
        let res = daemon.resource(&hello.target);
        let r = peer::accept_policy(res.as_ref(), hello);
        chosen = res;
        r
    })
    .await?;
    let res = chosen.expect("policy accepted a resource");
    tracing::info!(resource = %res.name(), peer = %who.peer, "peer connected and authenticated");
    peer::run_session(res, who.peer, stream).await;
    Ok(())
}
