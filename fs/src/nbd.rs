//! Block backend for an NBD export (the replicator's, or any NBD server) over a Unix socket.

use std::io;
use std::path::Path;

use parking_lot::Mutex;
use tandem_replicator::nbd::client::NbdClient;

use crate::block::BlockDevice;

/// An NBD export; one connection, requests serialised by a mutex (the filesystem core is
/// single-threaded underneath its own lock anyway).
pub struct NbdDevice {
    client: Mutex<NbdClient>,
    size_bytes: u64,
    /// A second connection, opened on first use, for flushes that must not hold up the
    /// first one's reads and writes (`flush_aside`). The export allows several
    /// connections (NBD_FLAG_CAN_MULTI_CONN): a flush on either covers the writes
    /// completed on both.
    aside: Mutex<Option<NbdClient>>,
    socket: std::path::PathBuf,
    export: String,
}

impl NbdDevice {
    pub fn connect(socket: &Path, export: &str) -> io::Result<Self> {
        let client = NbdClient::connect_unix(socket, export)?;
        let size_bytes = client.size_bytes();
        Ok(Self {
            client: Mutex::new(client),
            size_bytes,
            aside: Mutex::new(None),
            socket: socket.to_path_buf(),
            export: export.to_string(),
        })
    }
}

impl BlockDevice for NbdDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.client.lock().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // No FUA: the journal orders writes with explicit flushes.
        self.client.lock().write_at(buf, offset, false)
    }
    fn flush(&self) -> io::Result<()> {
        self.client.lock().flush()
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        self.client.lock().read_many(reqs)
    }
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> io::Result<()> {
        self.client.lock().write_many(reqs)
    }
    fn flush_aside(&self) -> io::Result<()> {
        let mut aside = self.aside.lock();
        if aside.is_none() {
            match NbdClient::connect_unix(&self.socket, &self.export) {
                Ok(c)
                    if c.transmission_flags()
                        & tandem_replicator::nbd::proto::TF_CAN_MULTI_CONN
                        != 0 =>
                {
                    *aside = Some(c)
                }
                Ok(_) => {
                    // A flush there would not cover our writes: use the main connection.
                    drop(aside);
                    return self.flush();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "second NBD connection failed; flushing on the first");
                    drop(aside);
                    return self.flush();
                }
            }
        }
        let res = aside.as_mut().expect("connected above").flush();
        if res.is_err() {
            *aside = None; // reconnect next time
        }
        res
    }
}

/// Parses `nbd+unix:///EXPORT?socket=PATH` (the NBD URI standard) into (socket, export).
pub fn parse_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("nbd+unix://")?;
    let (path, query) = rest.split_once('?')?;
    let export = path.strip_prefix('/').unwrap_or(path).to_string();
    let socket = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))?
        .to_string();
    (!socket.is_empty()).then_some((socket, export))
}

#[cfg(test)]
mod tests {
    use super::parse_uri;

    #[test]
    fn parses_nbd_unix_uris() {
        assert_eq!(
            parse_uri("nbd+unix:///www?socket=/run/t/www.sock"),
            Some(("/run/t/www.sock".into(), "www".into()))
        );
        assert_eq!(
            parse_uri("nbd+unix:///?socket=/s"),
            Some(("/s".into(), String::new()))
        );
        assert_eq!(parse_uri("nbd+unix:///x"), None);
        assert_eq!(parse_uri("nbd://host/x"), None);
    }
}
