//! Serves `tandemadm` requests on the control socket.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tandem_common::frame::{self, Channel};
use tokio::net::{UnixListener, UnixStream};

use super::Daemon;
use crate::control::{Request, Response, MAX_CONTROL_FRAME};

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another tandem-replicatord is already serving {} (stop it first)",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(daemon, stream).await {
                tracing::debug!(error = %e, "control client error");
            }
        });
    }
}

fn ok(message: impl Into<String>) -> Response {
    Response::Ok {
        message: message.into(),
    }
}

fn err(message: impl std::fmt::Display) -> Response {
    Response::Error {
        message: message.to_string(),
    }
}

async fn handle(daemon: Arc<Daemon>, mut s: UnixStream) -> anyhow::Result<()> {
    let req: Request = frame::read_msg(&mut s, Channel::Control, MAX_CONTROL_FRAME).await?;
    let need = |name: &str| {
        daemon.resource(name).ok_or_else(|| {
            format!("resource {name} is not up on this node (run `tandemadm up {name}`)")
        })
    };
    let resp = match req {
        Request::Ping => Response::Pong {
            pid: std::process::id(),
        },
        Request::Up { resource } => match daemon.up(&resource) {
            Ok(m) => ok(m),
            Err(e) => err(format!("{e:#}")),
        },
        Request::Down { resource } => match daemon.down(&resource).await {
            Ok(m) => ok(m),
            Err(e) => err(e),
        },
        Request::Primary { resource, force } => match need(&resource) {
            Ok(r) => match r.promote(force).await {
                Ok(()) => ok(format!("{resource}: Primary")),
                Err(e) => err(e),
            },
            Err(e) => err(e),
        },
        Request::Secondary { resource } => match need(&resource) {
            Ok(r) => match r.demote().await {
                Ok(()) => ok(format!("{resource}: Secondary")),
                Err(e) => err(e),
            },
            Err(e) => err(e),
        },
        Request::Connect {
            resource,
            discard_my_data,
        } => match need(&resource) {
            Ok(r) => {
                if discard_my_data && r.role() == crate::state::Role::Primary {
                    err("refusing --discard-my-data on a Primary: run `tandemadm secondary` first")
                } else {
                    r.admin_connect(discard_my_data);
                    ok(format!("{resource}: connecting"))
                }
            }
            Err(e) => err(e),
        },
        Request::Disconnect { resource } => match need(&resource) {
            Ok(r) => {
                r.admin_disconnect();
                ok(format!("{resource}: StandAlone"))
            }
            Err(e) => err(e),
        },
        Request::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => match need(&resource) {
            Ok(_) if !clear_bitmap => err("only `new-current-uuid --clear-bitmap` is supported"),
            Ok(r) => match r.new_current_uuid_clear_bitmap().await {
                Ok(()) => ok(format!(
                    "{resource}: new current UUID, UpToDate without sync"
                )),
                Err(e) => err(e),
            },
            Err(e) => err(e),
        },
        Request::Verify { resource } => match need(&resource) {
            Ok(r) => match r.start_verify() {
                Ok(peers) => ok(format!(
                    "{resource}: online verify started against {}",
                    peers.join(", ")
                )),
                Err(e) => err(e),
            },
            Err(e) => err(e),
        },
        Request::Invalidate { resource } => match need(&resource) {
            Ok(r) => match r.invalidate().await {
                Ok(()) => ok(format!("{resource}: Inconsistent, resyncing from a peer")),
                Err(e) => err(e),
            },
            Err(e) => err(e),
        },
        Request::InvalidateRemote { resource } => match need(&resource) {
            Ok(r) => match r.invalidate_remote().await {
                Ok(peers) => ok(format!("{resource}: resyncing {}", peers.join(", "))),
                Err(e) => err(e),
            },
            Err(e) => err(e),
        },
        Request::Outdate { resource } => match need(&resource) {
            Ok(r) => match r.outdate().await {
                Ok(()) => ok(format!("{resource}: Outdated")),
                Err(e) => err(e),
            },
            Err(e) => err(e),
        },
        Request::InjectDiskEio { resource } => match need(&resource) {
            Ok(r) => {
                tracing::warn!(resource = %resource, "fault injected: the local disk now fails every request with EIO");
                r.backing().inject_eio();
                ok(format!("{resource}: local disk now fails with EIO"))
            }
            Err(e) => err(e),
        },
        Request::Status { resource } => {
            let list: Vec<_> = daemon
                .up_resources()
                .into_iter()
                .filter(|r| resource.as_deref().is_none_or(|n| n == r.name()))
                .map(|r| r.status())
                .collect();
            match resource {
                Some(n) if list.is_empty() => err(format!("resource {n} is not up on this node")),
                _ => Response::Status(list),
            }
        }
        Request::Events { resource, now } => {
            let mut rx = daemon.events.subscribe();
            let keep = |line: &str| match &resource {
                Some(n) => {
                    line.contains(&format!(" name:{n} ")) || line.ends_with(&format!(" name:{n}"))
                }
                None => true,
            };
            for r in daemon.up_resources() {
                let st = r.status();
                let mut lines = vec![format!(
                    "exists resource name:{} role:{} suspended:no",
                    st.name, st.role
                )];
                lines.push(format!(
                    "exists device name:{} volume:0 disk:{} size:{}",
                    st.name, st.disk_state, st.size_bytes
                ));
                for c in &st.connections {
                    lines.push(format!(
                        "exists connection name:{} peer-node-id:{} conn-name:{} connection:{} role:{}",
                        st.name, c.peer_node_id, c.name, c.connection_state, c.peer_role
                    ));
                    lines.push(format!(
                        "exists peer-device name:{} peer-node-id:{} conn-name:{} volume:0 replication:{} peer-disk:{}",
                        st.name, c.peer_node_id, c.name, c.replication_state, c.peer_disk_state
                    ));
                }
                for l in lines.into_iter().filter(|l| keep(l)) {
                    frame::write_msg(&mut s, Channel::Control, &Response::Event(l)).await?;
                }
            }
            frame::write_msg(
                &mut s,
                Channel::Control,
                &Response::Event("exists -".into()),
            )
            .await?;
            if now {
                Response::End
            } else {
                loop {
                    match rx.recv().await {
                        Ok(line) if keep(&line) => {
                            frame::write_msg(&mut s, Channel::Control, &Response::Event(line))
                                .await?
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            frame::write_msg(
                                &mut s,
                                Channel::Control,
                                &Response::Event(format!("- lagged:{n}")),
                            )
                            .await?
                        }
                        Err(_) => break Response::End,
                    }
                }
            }
        }
    };
    frame::write_msg(&mut s, Channel::Control, &resp).await?;
    Ok(())
}
