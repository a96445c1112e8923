//! POSIX ACLs, stored as the xattrs `system.posix_acl_access` and
//! `system.posix_acl_default` in the kernel's own format (`posix_acl_xattr.h`): a
//! little-endian `u32` version (2), then 8-byte entries `{u16 tag, u16 perm, u32 id}`
//! sorted by tag. Ids are those of the initial user namespace (the daemon runs there).
//!
//! With `FUSE_POSIX_ACL` the kernel enforces ACLs and caches them per inode, and leaves
//! three jobs to the filesystem, done here as the kernel's own `posix_acl.c` does them:
//! - setting an access ACL updates the mode (`equiv_mode`), and an ACL that says no more
//!   than the mode is not stored at all;
//! - chmod rewrites the access ACL's owner, mask (or group) and other entries (`chmod`);
//! - a new inode in a directory with a default ACL inherits it, masked by the mode the
//!   creator asked for, and the umask does not apply (`create_masq`).

use crate::error::{FsError, Result};

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER_BYTES: usize = 4;
const ENTRY_BYTES: usize = 8;

pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;
/// The id of the entries that name no one (owner, owning group, mask, other).
pub const UNDEFINED_ID: u32 = u32::MAX;

const READ: u16 = 4;
const WRITE: u16 = 2;
const EXECUTE: u16 = 1;
const RWX: u16 = READ | WRITE | EXECUTE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// A valid ACL (`posix_acl_valid`): owner, named users, owning group, named groups,
/// mask, other, in that order; a mask whenever a named entry exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

/// True for the two ACL xattr names.
pub fn is_acl_name(name: &[u8]) -> bool {
    name == ACCESS || name == DEFAULT
}

impl Acl {
    /// Parses and validates an xattr value. Anything else than what the kernel writes is
    /// refused (EINVAL), so a stored ACL always parses.
    pub fn parse(b: &[u8]) -> Result<Acl> {
        if b.len() < HEADER_BYTES + ENTRY_BYTES || (b.len() - HEADER_BYTES) % ENTRY_BYTES != 0 {
            return Err(FsError::Invalid("POSIX ACL of a wrong size"));
        }
        if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != VERSION {
            return Err(FsError::Invalid("POSIX ACL of an unknown version"));
        }
        let entries = b[HEADER_BYTES..]
            .chunks_exact(ENTRY_BYTES)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        let acl = Acl { entries };
        acl.validate()?;
        Ok(acl)
    }

    /// The minimal ACL that says what `mode` says (for tests and tools).
    pub fn from_mode(mode: u32) -> Acl {
        let e = |tag, perm: u32| Entry {
            tag,
            perm: (perm & 7) as u16,
            id: UNDEFINED_ID,
        };
        Acl {
            entries: vec![
                e(USER_OBJ, mode >> 6),
                e(GROUP_OBJ, mode >> 3),
                e(OTHER, mode),
            ],
        }
    }

    /// Builds an ACL from entries, validated like a parsed one.
    pub fn from_entries(entries: Vec<Entry>) -> Result<Acl> {
        let acl = Acl { entries };
        acl.validate()?;
        Ok(acl)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + ENTRY_BYTES * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// The state machine of the kernel's `posix_acl_valid`.
    fn validate(&self) -> Result<()> {
        #[derive(PartialEq)]
        enum S {
            UserObj,
            User,
            Group,
            Other,
            Done,
        }
        let bad = |why| Err(FsError::Invalid(why));
        let mut state = S::UserObj;
        let mut needs_mask = false;
        for e in &self.entries {
            if e.perm & !RWX != 0 {
                return bad("POSIX ACL entry with unknown permission bits");
            }
            state = match (e.tag, state) {
                (USER_OBJ, S::UserObj) => S::User,
                (USER, S::User) => {
                    needs_mask = true;
                    S::User
                }
                (GROUP_OBJ, S::User) => S::Group,
                (GROUP, S::Group) => {
                    needs_mask = true;
                    S::Group
                }
                (MASK, S::Group) => S::Other,
                (OTHER, S::Other) => S::Done,
                (OTHER, S::Group) if !needs_mask => S::Done,
                (OTHER, S::Group) => return bad("POSIX ACL with named entries but no mask"),
                (USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER, _) => {
                    return bad("POSIX ACL entries out of order or repeated")
                }
                _ => return bad("POSIX ACL entry with an unknown tag"),
            };
            if (e.tag == USER || e.tag == GROUP) && e.id == UNDEFINED_ID {
                return bad("POSIX ACL names an undefined id");
            }
        }
        if state != S::Done {
            return bad("POSIX ACL without owner, group and other entries");
        }
        Ok(())
    }

    /// `posix_acl_equiv_mode`: the mode's permission bits as this ACL sets them (the
    /// group bits are the mask's when there is one), and whether the ACL says nothing
    /// beyond them (then it need not be stored).
    pub fn equiv_mode(&self, mode: u32) -> (u32, bool) {
        let mut bits = 0u32;
        let mut equiv = true;
        for e in &self.entries {
            let p = u32::from(e.perm & RWX);
            match e.tag {
                USER_OBJ => bits |= p << 6,
                GROUP_OBJ => bits |= p << 3,
                OTHER => bits |= p,
                MASK => {
                    bits = (bits & !0o070) | (p << 3);
                    equiv = false;
                }
                _ => equiv = false,
            }
        }
        ((mode & !0o777) | bits, equiv)
    }

    /// `posix_acl_chmod`: a chmod sets the owner, mask (owning group without a mask) and
    /// other entries; named entries keep their permissions under the new mask.
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => e.perm = ((mode >> 6) & 7) as u16,
                MASK => e.perm = ((mode >> 3) & 7) as u16,
                GROUP_OBJ if !has_mask => e.perm = ((mode >> 3) & 7) as u16,
                OTHER => e.perm = (mode & 7) as u16,
                _ => {}
            }
        }
    }

    /// `posix_acl_create_masq`: turns a parent's default ACL into a new inode's access
    /// ACL under the mode the creator asked for. Returns the new mode and whether the
    /// access ACL must be stored (it says more than the mode).
    pub fn create_masq(&mut self, mode: u32) -> (u32, bool) {
        let mut m = mode & 0o777;
        let mut not_equiv = false;
        let (mut group_obj, mut mask) = (None, None);
        for (k, e) in self.entries.iter_mut().enumerate() {
            match e.tag {
                USER_OBJ => {
                    e.perm &= ((m >> 6) & 7) as u16;
                    m &= (u32::from(e.perm) << 6) | !0o700;
                }
                USER | GROUP => not_equiv = true,
                GROUP_OBJ => group_obj = Some(k),
                OTHER => {
                    e.perm &= (m & 7) as u16;
                    m &= u32::from(e.perm) | !0o007;
                }
                MASK => {
                    mask = Some(k);
                    not_equiv = true;
                }
                _ => {}
            }
        }
        // validate() guarantees an owning-group entry.
        if let Some(k) = mask.or(group_obj) {
            let e = &mut self.entries[k];
            e.perm &= ((m >> 3) & 7) as u16;
            m &= (u32::from(e.perm) << 3) | !0o070;
        }
        ((mode & !0o777) | m, not_equiv)
    }

    /// `posix_acl_permission`: may a caller with `uid` and `groups` (primary and
    /// supplementary) have `want` (rwx bits) on an inode owned by `owner`:`owner_gid`?
    pub fn permits(&self, uid: u32, groups: &[u32], owner: u32, owner_gid: u32, want: u32) -> bool {
        let want = (want & 7) as u16;
        let mask = self
            .entries
            .iter()
            .find(|e| e.tag == MASK)
            .map_or(RWX, |e| e.perm);
        let mut group_found = false;
        for e in &self.entries {
            match e.tag {
                USER_OBJ if uid == owner => return e.perm & want == want,
                USER if e.id == uid => return e.perm & mask & want == want,
                GROUP_OBJ | GROUP => {
                    let gid = if e.tag == GROUP_OBJ { owner_gid } else { e.id };
                    if groups.contains(&gid) {
                        group_found = true;
                        if e.perm & mask & want == want {
                            return true;
                        }
                    }
                }
                OTHER if !group_found => return e.perm & want == want,
                _ => {}
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(tag: u16, perm: u16, id: u32) -> Entry {
        Entry { tag, perm, id }
    }

    fn named() -> Acl {
        Acl::from_entries(vec![
            ent(USER_OBJ, 6, UNDEFINED_ID),
            ent(USER, 4, 1000),
            ent(GROUP_OBJ, 4, UNDEFINED_ID),
            ent(GROUP, 6, 50),
            ent(MASK, 6, UNDEFINED_ID),
            ent(OTHER, 0, UNDEFINED_ID),
        ])
        .unwrap()
    }

    #[test]
    fn bytes_round_trip_and_match_the_kernel_layout() {
        let a = named();
        let b = a.to_bytes();
        assert_eq!(b.len(), 4 + 6 * 8);
        assert_eq!(&b[..4], &[2, 0, 0, 0]);
        // Second entry: ACL_USER, r--, uid 1000.
        assert_eq!(&b[12..20], &[2, 0, 4, 0, 0xe8, 3, 0, 0]);
        assert_eq!(Acl::parse(&b).unwrap(), a);
    }

    #[test]
    fn malformed_values_are_refused_never_accepted() {
        let good = named().to_bytes();
        assert!(Acl::parse(&[]).is_err());
        assert!(Acl::parse(&good[..4]).is_err());
        assert!(Acl::parse(&good[..good.len() - 1]).is_err());
        let mut v = good.clone();
        v[0] = 1;
        assert!(Acl::parse(&v).is_err(), "version");
        let mut v = good.clone();
        v[6] = 8;
        assert!(Acl::parse(&v).is_err(), "perm bits");
        let mut v = good.clone();
        v[4] = 0x40;
        assert!(Acl::parse(&v).is_err(), "tag");
        let u = UNDEFINED_ID;
        let bad: [(&str, Vec<Entry>); 4] = [
            (
                "named entries without a mask",
                vec![
                    ent(USER_OBJ, 6, u),
                    ent(USER, 4, 1000),
                    ent(GROUP_OBJ, 4, u),
                    ent(OTHER, 0, u),
                ],
            ),
            (
                "out of order",
                vec![ent(GROUP_OBJ, 4, u), ent(USER_OBJ, 6, u), ent(OTHER, 0, u)],
            ),
            (
                "repeated",
                vec![
                    ent(USER_OBJ, 6, u),
                    ent(USER_OBJ, 6, u),
                    ent(GROUP_OBJ, 4, u),
                    ent(OTHER, 0, u),
                ],
            ),
            (
                "no other entry",
                vec![ent(USER_OBJ, 6, u), ent(GROUP_OBJ, 4, u)],
            ),
        ];
        for (why, entries) in bad {
            assert!(Acl::from_entries(entries).is_err(), "{why}");
        }
        // Every truncation and every single-byte flip either parses to a valid ACL or
        // is refused; none panics.
        for n in 0..good.len() {
            let _ = Acl::parse(&good[..n]);
            for bit in 0..8 {
                let mut v = good.clone();
                v[n] ^= 1 << bit;
                if let Ok(a) = Acl::parse(&v) {
                    a.validate().unwrap();
                }
            }
        }
    }

    #[test]
    fn equiv_mode_takes_the_group_bits_from_the_mask() {
        let (m, equiv) = Acl::from_mode(0o751).equiv_mode(0o100000 | 0o4000);
        assert_eq!(m, 0o104751);
        assert!(equiv);
        let (m, equiv) = named().equiv_mode(0o100777);
        assert_eq!(m, 0o100660);
        assert!(!equiv);
    }

    #[test]
    fn chmod_sets_the_mask_not_the_owning_group() {
        let mut a = named();
        a.chmod(0o751);
        let p: Vec<u16> = a.entries().iter().map(|e| e.perm).collect();
        assert_eq!(p, vec![7, 4, 4, 6, 5, 1]);
        let mut b = Acl::from_mode(0o600);
        b.chmod(0o754);
        assert_eq!(b, Acl::from_mode(0o754));
    }

    #[test]
    fn create_masq_masks_the_inherited_entries_with_the_requested_mode() {
        // Default ACL u::rwx,u:1000:r--,g::r-x,g:50:rw-,m::rwx,o::r-x; open(O_CREAT, 0666).
        let mut d = Acl::from_entries(vec![
            ent(USER_OBJ, 7, UNDEFINED_ID),
            ent(USER, 4, 1000),
            ent(GROUP_OBJ, 5, UNDEFINED_ID),
            ent(GROUP, 6, 50),
            ent(MASK, 7, UNDEFINED_ID),
            ent(OTHER, 5, UNDEFINED_ID),
        ])
        .unwrap();
        let (m, store) = d.create_masq(0o100666);
        assert_eq!(m, 0o100664);
        assert!(store);
        let p: Vec<u16> = d.entries().iter().map(|e| e.perm).collect();
        assert_eq!(p, vec![6, 4, 5, 6, 6, 4]);
        // A default ACL that is only the three base entries yields a plain mode.
        let mut d = Acl::from_mode(0o750);
        let (m, store) = d.create_masq(0o40777);
        assert_eq!(m, 0o40750);
        assert!(!store);
    }

    #[test]
    fn permission_follows_posix_acl_permission() {
        let a = named(); // u::rw- u:1000:r-- g::r-- g:50:rw- m::rw- o::---
        assert!(a.permits(0, &[], 0, 0, 6), "owner");
        assert!(a.permits(1000, &[], 0, 0, 4));
        assert!(!a.permits(1000, &[], 0, 0, 2));
        assert!(a.permits(7, &[50], 0, 0, 6), "named group");
        assert!(a.permits(7, &[9], 0, 9, 4), "owning group");
        assert!(!a.permits(7, &[9], 0, 9, 2), "owning group, not write");
        assert!(!a.permits(7, &[51], 0, 0, 4), "other gets nothing");
        let mut masked = a.clone();
        masked.chmod(0o600); // mask ---
        assert!(
            !masked.permits(1000, &[], 0, 0, 4),
            "mask limits named users"
        );
    }
}
