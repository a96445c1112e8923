//! The frame format used on every Tandem socket (replication, lock client, Raft peers,
//! control). Layout (little endian), 16-byte header then payload:
//!
//! ```text
//! 0  u32 magic   0x4D444E54 ("TNDM")
//! 4  u8  version FRAME_VERSION
//! 5  u8  channel which protocol the payload belongs to (see `Channel`)
//! 6  u16 reserved, must be 0
//! 8  u32 len     payload length in bytes (bounded per channel by the reader)
//! 12 u32 crc32   crc32 (IEEE, crc32fast) of header bytes 0..12 followed by the payload
//! ```
//!
//! Payloads are bincode 2 (serde, standard config) encodings of a per-protocol message enum.
//! A frame that fails any check is an error; callers drop the connection.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const FRAME_MAGIC: u32 = 0x4D44_4E54;
pub const FRAME_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;

/// Protocol families carried in frames; a reader refuses frames of another channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    Handshake = 0,
    Replication = 1,
    Control = 2,
    LockClient = 3,
    LockPeer = 4,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x} (not a Tandem peer?)")]
    BadMagic(u32),
    #[error("unsupported frame version {0} (this build speaks {FRAME_VERSION})")]
    BadVersion(u8),
    #[error("frame for channel {got} on a channel-{want} socket")]
    WrongChannel { got: u8, want: u8 },
    #[error("reserved frame bits set ({0:#06x})")]
    Reserved(u16),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// bincode's own limit: without one, a hostile length prefix inside a valid frame makes the
/// decoder reserve that many bytes up front (found by the fuzz corpus replay). Frames are
/// at most ~32 MiB, so 64 MiB bounds any single allocation.
pub const DECODE_LIMIT_BYTES: usize = 64 << 20;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>()
}

/// Parsed and checked header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub channel: u8,
    pub len: u32,
    pub crc: u32,
}

/// Checks a header; the checksum is checked once the payload is read.
pub fn parse_header(
    bytes: &[u8; HEADER_LEN],
    channel: Channel,
    max_len: u32,
) -> Result<Header, FrameError> {
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if bytes[4] != FRAME_VERSION {
        return Err(FrameError::BadVersion(bytes[4]));
    }
    if bytes[5] != channel as u8 {
        return Err(FrameError::WrongChannel {
            got: bytes[5],
            want: channel as u8,
        });
    }
    let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    Ok(Header {
        channel: bytes[5],
        len,
        crc,
    })
}

fn checksum(header12: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header12);
    h.update(payload);
    h.finalize()
}

fn verify(header: &[u8; HEADER_LEN], parsed: Header, payload: &[u8]) -> Result<(), FrameError> {
    let computed = checksum(&header[..12], payload);
    if computed != parsed.crc {
        return Err(FrameError::Checksum {
            stored: parsed.crc,
            computed,
        });
    }
    Ok(())
}

/// Builds a complete frame around an already-encoded payload.
pub fn frame_bytes(channel: Channel, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.push(FRAME_VERSION);
    out.push(channel as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    let len = u32::try_from(payload.len()).expect("frame payload fits u32");
    out.extend_from_slice(&len.to_le_bytes());
    let crc = checksum(&out[..12], payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes a message as a complete frame.
pub fn encode<T: Serialize>(channel: Channel, msg: &T) -> Result<Vec<u8>, FrameError> {
    let payload = bincode::serde::encode_to_vec(msg, bincode_config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    Ok(frame_bytes(channel, &payload))
}

/// Decodes a payload; trailing bytes are an error (a message must fill its frame).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, bincode_config())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Decode(format!(
            "{} trailing bytes after message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

/// Pure decoder over a byte buffer (used by the fuzz targets): returns the message and the
/// number of bytes consumed, `Ok(None)` if more bytes are needed.
pub fn decode_from_buf<T: DeserializeOwned>(
    buf: &[u8],
    channel: Channel,
    max_len: u32,
) -> Result<Option<(T, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("16 bytes");
    let parsed = parse_header(header, channel, max_len)?;
    let end = HEADER_LEN + parsed.len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let payload = &buf[HEADER_LEN..end];
    verify(header, parsed, payload)?;
    Ok(Some((decode_payload(payload)?, end)))
}

/// Reads one frame's payload from a stream.
pub async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    channel: Channel,
    max_len: u32,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let parsed = parse_header(&header, channel, max_len)?;
    let mut payload = vec![0u8; parsed.len as usize];
    reader.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    })?;
    verify(&header, parsed, &payload)?;
    Ok(payload)
}

/// Reads and decodes one message.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    channel: Channel,
    max_len: u32,
) -> Result<T, FrameError> {
    let payload = read_payload(reader, channel, max_len).await?;
    decode_payload(&payload)
}

/// Encodes and writes one message (not flushed: wrap in BufWriter and flush per batch).
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    channel: Channel,
    msg: &T,
) -> Result<(), FrameError> {
    let bytes = encode(channel, msg)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Msg {
        Ping { seq: u64 },
        Data { offset: u64, bytes: Vec<u8> },
    }

    #[test]
    fn round_trip() {
        for msg in [
            Msg::Ping { seq: 7 },
            Msg::Data {
                offset: 4096,
                bytes: vec![1, 2, 3],
            },
        ] {
            let f = encode(Channel::Replication, &msg).unwrap();
            let (back, used): (Msg, usize) = decode_from_buf(&f, Channel::Replication, 1 << 20)
                .unwrap()
                .unwrap();
            assert_eq!(back, msg);
            assert_eq!(used, f.len());
        }
    }

    #[test]
    fn rejects_corruption_everywhere() {
        let f = encode(Channel::Replication, &Msg::Ping { seq: 1 }).unwrap();
        for i in 0..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 0x40;
            let r: Result<Option<(Msg, usize)>, _> =
                decode_from_buf(&bad, Channel::Replication, 1 << 20);
            assert!(!matches!(r, Ok(Some(_))), "flip at byte {i} accepted");
        }
    }

    #[test]
    fn rejects_wrong_channel_and_size() {
        let f = encode(Channel::Control, &Msg::Ping { seq: 1 }).unwrap();
        let r: Result<Option<(Msg, usize)>, _> = decode_from_buf(&f, Channel::Replication, 1 << 20);
        assert!(matches!(r, Err(FrameError::WrongChannel { .. })));
        let big = encode(
            Channel::Replication,
            &Msg::Data {
                offset: 0,
                bytes: vec![0; 100],
            },
        )
        .unwrap();
        let r: Result<Option<(Msg, usize)>, _> = decode_from_buf(&big, Channel::Replication, 10);
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn stream_round_trip_and_eof() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_msg(&mut a, Channel::Replication, &Msg::Ping { seq: 9 })
            .await
            .unwrap();
        drop(a);
        let m: Msg = read_msg(&mut b, Channel::Replication, 1024).await.unwrap();
        assert_eq!(m, Msg::Ping { seq: 9 });
        let r: Result<Msg, _> = read_msg(&mut b, Channel::Replication, 1024).await;
        assert!(matches!(r, Err(FrameError::Closed)));
    }
}
