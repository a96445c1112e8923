//! NBD: the export every resource offers on a Unix socket, and a small client.

pub mod client;
pub mod proto;
pub mod server;
