//! pread/pwrite/fdatasync on tokio's blocking pool: the portable fallback engine.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

pub struct PosixEngine {
    file: Arc<File>,
}

fn join_err(e: tokio::task::JoinError) -> std::io::Error {
    std::io::Error::other(format!("blocking i/o task failed: {e}"))
}

impl PosixEngine {
    pub fn new(file: Arc<File>) -> Self {
        Self { file }
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
        .map_err(join_err)?
    }

    pub async fn write_at(&self, offset: u64, data: Vec<u8>) -> std::io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
            .await
            .map_err(join_err)?
    }

    pub async fn sync(&self) -> std::io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(join_err)?
    }
}
