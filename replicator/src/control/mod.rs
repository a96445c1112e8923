//! The control socket between `tandemadm` and `tandem-replicatord`: one request per
//! connection, answered by one response (or, for `Events`, a stream of lines).
//! Frames on `Channel::Control`; the socket is root-only (0600).

use serde::{Deserialize, Serialize};
use std::path::Path;
use tandem_common::frame::{self, Channel, FrameError};
use tokio::net::UnixStream;

use crate::engine::ResourceStatus;

pub const MAX_CONTROL_FRAME: u32 = 4 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Request {
    Ping,
    Up {
        resource: String,
    },
    Down {
        resource: String,
    },
    Primary {
        resource: String,
        force: bool,
    },
    Secondary {
        resource: String,
    },
    Connect {
        resource: String,
        discard_my_data: bool,
    },
    Disconnect {
        resource: String,
    },
    Status {
        resource: Option<String>,
    },
    NewCurrentUuid {
        resource: String,
        clear_bitmap: bool,
    },
    Verify {
        resource: String,
    },
    Invalidate {
        resource: String,
    },
    InvalidateRemote {
        resource: String,
    },
    Outdate {
        resource: String,
    },
    /// Fault switch for tests and drills: make the local disk fail every request with EIO.
    InjectDiskEio {
        resource: String,
    },
    /// Streams events2-style lines; `now` = dump current state and stop.
    Events {
        resource: Option<String>,
        now: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Ok { message: String },
    Error { message: String },
    Pong { pid: u32 },
    Status(Vec<ResourceStatus>),
    Event(String),
    End,
}

/// Sends one request and returns the first response (the stream for Events).
pub async fn call(socket: &Path, req: &Request) -> Result<(UnixStream, Response), FrameError> {
    let mut s = UnixStream::connect(socket).await?;
    frame::write_msg(&mut s, Channel::Control, req).await?;
    let resp = frame::read_msg(&mut s, Channel::Control, MAX_CONTROL_FRAME).await?;
    Ok((s, resp))
}

/// Reads the next response of a stream.
pub async fn next(s: &mut UnixStream) -> Result<Response, FrameError> {
    frame::read_msg(s, Channel::Control, MAX_CONTROL_FRAME).await
}
