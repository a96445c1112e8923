//! NBD protocol constants and the pure parsers for the fixed-newstyle handshake options and
//! transmission requests (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload we accept during the handshake.
pub const MAX_OPTION_BYTES: u32 = 4096;
/// Largest READ/WRITE we accept (NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NbdParseError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
    #[error("malformed option: {0}")]
    BadOption(&'static str),
}

/// Parses the 28-byte transmission request header.
pub fn parse_request(b: &[u8; 28]) -> Result<Request, NbdParseError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
    if magic != REQUEST_MAGIC {
        return Err(NbdParseError::BadMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        handle: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
        length: u32::from_be_bytes(b[24..28].try_into().expect("4")),
    })
}

impl Request {
    /// The 28-byte header a client sends (what `parse_request` reads back).
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: export name and requested info types.
pub fn parse_go(data: &[u8]) -> Result<(String, Vec<u16>), NbdParseError> {
    if data.len() < 6 {
        return Err(NbdParseError::BadOption(
            "GO/INFO payload shorter than 6 bytes",
        ));
    }
    let name_len = u32::from_be_bytes(data[0..4].try_into().expect("4")) as usize;
    let rest = &data[4..];
    if name_len > rest.len().saturating_sub(2) {
        return Err(NbdParseError::BadOption(
            "export name length exceeds payload",
        ));
    }
    let name = String::from_utf8(rest[..name_len].to_vec())
        .map_err(|_| NbdParseError::BadOption("export name is not UTF-8"))?;
    let rest = &rest[name_len..];
    let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let rest = &rest[2..];
    if rest.len() != n * 2 {
        return Err(NbdParseError::BadOption(
            "info request count does not match payload",
        ));
    }
    let infos = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, infos))
}

pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    r
}

pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(parse_request(&r.encode()).unwrap(), r);
    }

    #[test]
    fn go_parses_and_rejects() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"www");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_go(&d).unwrap(), ("www".into(), vec![INFO_BLOCK_SIZE]));
        let mut bad = d.clone();
        bad[3] = 200;
        assert!(parse_go(&bad).is_err());
        assert!(parse_go(&d[..5]).is_err());
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_go(&extra).is_err());
    }

    #[test]
    fn request_magic_checked() {
        let mut b = [0u8; 28];
        assert!(parse_request(&b).is_err());
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[7] = 1;
        b[27] = 9;
        let r = parse_request(&b).unwrap();
        assert_eq!((r.kind, r.length), (CMD_WRITE, 9));
    }

    #[test]
    fn random_headers_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..5000 {
            let mut b = [0u8; 28];
            rng.fill(&mut b[..]);
            let _ = parse_request(&b);
            let n = rng.gen_range(0..40);
            let v: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            let _ = parse_go(&v);
        }
    }
}
