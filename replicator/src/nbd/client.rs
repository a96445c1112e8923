//! A small synchronous NBD client (fixed newstyle, OPT_GO, simple replies) over a Unix
//! socket. `mount.tandem` uses it as its block backend; tests and the benchmark use it to
//! talk to the replicator's export. One request at a time per client; open several
//! clients for parallelism (the export advertises CAN_MULTI_CONN).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::proto::*;

pub struct NbdClient {
    stream: UnixStream,
    size_bytes: u64,
    flags: u16,
    next_handle: u64,
}

fn proto_err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Maps an NBD error code to an io::Error with the matching errno.
fn nbd_error(code: u32) -> std::io::Error {
    std::io::Error::from_raw_os_error(code as i32)
}

impl NbdClient {
    /// Connects to `path` and opens `export_name` ("" for the default export).
    pub fn connect_unix(path: &Path, export_name: &str) -> std::io::Result<Self> {
        let mut s = UnixStream::connect(path)?;
        let mut hdr = [0u8; 18];
        s.read_exact(&mut hdr)?;
        if u64::from_be_bytes(hdr[0..8].try_into().expect("8")) != NBDMAGIC
            || u64::from_be_bytes(hdr[8..16].try_into().expect("8")) != IHAVEOPT
        {
            return Err(proto_err("not an NBD newstyle server"));
        }
        let server_flags = u16::from_be_bytes([hdr[16], hdr[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err("server is not fixed-newstyle"));
        }
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            cflags |= CLIENT_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;
        let mut data = (export_name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export_name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut size = None;
        let mut flags = 0;
        loop {
            let mut r = [0u8; 20];
            s.read_exact(&mut r)?;
            if u64::from_be_bytes(r[0..8].try_into().expect("8")) != OPT_REPLY_MAGIC {
                return Err(proto_err("bad option reply magic"));
            }
            let kind = u32::from_be_bytes(r[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(r[16..20].try_into().expect("4"));
            if len > MAX_OPTION_BYTES {
                return Err(proto_err("option reply too large"));
            }
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload)?;
            match kind {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().expect("8")));
                    flags = u16::from_be_bytes([payload[10], payload[11]]);
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!(
                            "NBD server refused export {export_name:?}: {}",
                            String::from_utf8_lossy(&payload)
                        ),
                    ))
                }
                _ => {}
            }
        }
        let size_bytes = size.ok_or_else(|| proto_err("server sent no export size"))?;
        Ok(Self {
            stream: s,
            size_bytes,
            flags,
            next_handle: 1,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let header = Request {
            flags,
            kind,
            handle,
            offset,
            length,
        }
        .encode();
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&header);
        h.extend_from_slice(payload);
        self.stream.write_all(&h)?;
        Ok(handle)
    }

    fn reply(&mut self, handle: u64) -> std::io::Result<()> {
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r)?;
        if u32::from_be_bytes(r[0..4].try_into().expect("4")) != SIMPLE_REPLY_MAGIC {
            return Err(proto_err("bad reply magic"));
        }
        if u64::from_be_bytes(r[8..16].try_into().expect("8")) != handle {
            return Err(proto_err("reply for an unexpected handle"));
        }
        match u32::from_be_bytes(r[4..8].try_into().expect("4")) {
            0 => Ok(()),
            code => Err(nbd_error(code)),
        }
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST_BYTES as usize).enumerate() {
            let off = offset + (i * MAX_REQUEST_BYTES as usize) as u64;
            let h = self.request(CMD_READ, 0, off, chunk.len() as u32, &[])?;
            self.reply(h)?;
            self.stream.read_exact(chunk)?;
        }
        Ok(())
    }

    /// Reads several ranges with up to `READ_MANY_WINDOW` requests in flight; replies may
    /// come in any order (NBD allows it). The first error is returned after every reply in
    /// flight has been read, so the connection stays usable.
    pub fn read_many(&mut self, reqs: &mut [(u64, &mut [u8])]) -> std::io::Result<()> {
        const READ_MANY_WINDOW: usize = 32;
        if reqs
            .iter()
            .any(|(_, b)| b.len() > MAX_REQUEST_BYTES as usize)
        {
            return Err(proto_err(
                "read_many: a range exceeds the largest NBD request",
            ));
        }
        let mut in_flight: Vec<(u64, usize)> = Vec::with_capacity(READ_MANY_WINDOW);
        let mut next = 0;
        let mut first_err = None;
        while (next < reqs.len() && first_err.is_none()) || !in_flight.is_empty() {
            while first_err.is_none() && next < reqs.len() && in_flight.len() < READ_MANY_WINDOW {
                let (off, buf) = &reqs[next];
                let h = self.request(CMD_READ, 0, *off, buf.len() as u32, &[])?;
                in_flight.push((h, next));
                next += 1;
            }
            let mut r = [0u8; 16];
            self.stream.read_exact(&mut r)?;
            if u32::from_be_bytes(r[0..4].try_into().expect("4")) != SIMPLE_REPLY_MAGIC {
                return Err(proto_err("bad reply magic"));
            }
            let handle = u64::from_be_bytes(r[8..16].try_into().expect("8"));
            let pos = in_flight
                .iter()
                .position(|(h, _)| *h == handle)
                .ok_or_else(|| proto_err("reply for an unexpected handle"))?;
            let (_, idx) = in_flight.swap_remove(pos);
            match u32::from_be_bytes(r[4..8].try_into().expect("4")) {
                0 => self.stream.read_exact(reqs[idx].1)?,
                code => {
                    first_err.get_or_insert(nbd_error(code));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Writes several ranges with up to `WRITE_MANY_WINDOW` requests in flight (no order
    /// among them: for writes that may land in any order, like a journal's home writes).
    /// The first error is returned after every reply in flight has been read.
    pub fn write_many(&mut self, reqs: &[(u64, &[u8])]) -> std::io::Result<()> {
        const WRITE_MANY_WINDOW: usize = 32;
        // Ranges beyond the largest request go out in pieces, like `write_at`.
        let max = MAX_REQUEST_BYTES as usize;
        let pieces: Vec<(u64, &[u8])>;
        let reqs = if reqs.iter().any(|(_, b)| b.len() > max) {
            pieces = reqs
                .iter()
                .flat_map(|(off, b)| {
                    b.chunks(max)
                        .enumerate()
                        .map(move |(i, c)| (off + (i * max) as u64, c))
                })
                .collect();
            &pieces[..]
        } else {
            reqs
        };
        let mut in_flight: Vec<u64> = Vec::with_capacity(WRITE_MANY_WINDOW);
        let mut next = 0;
        let mut first_err = None;
        while (next < reqs.len() && first_err.is_none()) || !in_flight.is_empty() {
            while first_err.is_none() && next < reqs.len() && in_flight.len() < WRITE_MANY_WINDOW {
                let (off, buf) = reqs[next];
                let h = self.request(CMD_WRITE, 0, off, buf.len() as u32, buf)?;
                in_flight.push(h);
                next += 1;
            }
            let mut r = [0u8; 16];
            self.stream.read_exact(&mut r)?;
            if u32::from_be_bytes(r[0..4].try_into().expect("4")) != SIMPLE_REPLY_MAGIC {
                return Err(proto_err("bad reply magic"));
            }
            let handle = u64::from_be_bytes(r[8..16].try_into().expect("8"));
            let pos = in_flight
                .iter()
                .position(|h| *h == handle)
                .ok_or_else(|| proto_err("reply for an unexpected handle"))?;
            in_flight.swap_remove(pos);
            if let code @ 1.. = u32::from_be_bytes(r[4..8].try_into().expect("4")) {
                first_err.get_or_insert(nbd_error(code));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    pub fn write_at(&mut self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        for (i, chunk) in buf.chunks(MAX_REQUEST_BYTES as usize).enumerate() {
            let off = offset + (i * MAX_REQUEST_BYTES as usize) as u64;
            let h = self.request(CMD_WRITE, flags, off, chunk.len() as u32, chunk)?;
            self.reply(h)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        let h = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(h)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> std::io::Result<()> {
        let h = self.request(CMD_TRIM, 0, offset, len, &[])?;
        self.reply(h)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> std::io::Result<()> {
        let h = self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])?;
        self.reply(h)
    }

    /// The negotiated connection, for callers that pipeline requests themselves (the
    /// overload tests send without waiting for replies).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Sends NBD_CMD_DISC; the connection closes.
    pub fn disconnect(mut self) -> std::io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[]).map(|_| ())
    }
}
