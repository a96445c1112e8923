//! Reference-model property test (mountpoint-s3's reftests pattern): random operation
//! sequences run against the real FUSE mount and against an in-memory model of POSIX
//! semantics; every result (success or errno) and the whole tree must agree after each step.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;

const PATHS: &[&str] = &["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a", "f"];

#[derive(Debug, Clone)]
enum Op {
    WriteNew(usize, Vec<u8>),
    WriteAt(usize, u16, Vec<u8>),
    Truncate(usize, u16),
    Unlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    Rename(usize, usize),
    Link(usize, usize),
    Symlink(usize),
    Remount,
}

/// Symlinks point outside the mount at a path that cannot exist, so following one fails
/// with ENOENT on both sides.
const LINK_TARGET: &str = "/nonexistent-tandem-reftest/target";

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    let data = prop::collection::vec(any::<u8>(), 0..6000);
    prop_oneof![
        3 => (p.clone(), data.clone()).prop_map(|(p, d)| Op::WriteNew(p, d)),
        2 => (p.clone(), any::<u16>(), data).prop_map(|(p, o, d)| Op::WriteAt(p, o, d)),
        1 => (p.clone(), any::<u16>()).prop_map(|(p, n)| Op::Truncate(p, n)),
        2 => p.clone().prop_map(Op::Unlink),
        3 => p.clone().prop_map(Op::Mkdir),
        1 => p.clone().prop_map(Op::Rmdir),
        2 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => p.prop_map(Op::Symlink),
        1 => Just(Op::Remount),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// A regular file: an id into `Model::files`, shared by hard links.
    File(u32),
    Dir,
    Symlink(String),
}

/// What a tree walk sees, from the model or from the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
enum View {
    File { data: Vec<u8>, nlink: u64 },
    Dir,
    Symlink(String),
}

/// The reference: a map from path to node, with POSIX error rules.
#[derive(Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
    files: BTreeMap<u32, Vec<u8>>,
    next_id: u32,
}

type Res = Result<(), i32>;

impl Model {
    fn parent_ok(&self, path: &str) -> Res {
        match path.rsplit_once('/') {
            None => Ok(()),
            Some((parent, _)) => {
                self.parent_ok(parent)?;
                match self.nodes.get(parent) {
                    Some(Node::Dir) => Ok(()),
                    Some(Node::File(_)) => Err(libc::ENOTDIR),
                    // The walk follows the link to a target that does not exist.
                    Some(Node::Symlink(_)) | None => Err(libc::ENOENT),
                }
            }
        }
    }

    fn children(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.nodes.keys().any(|k| k.starts_with(&prefix))
    }

    /// The file a path opens (following a symlink fails: targets never exist).
    fn open_file(&mut self, p: &str) -> Result<&mut Vec<u8>, i32> {
        self.parent_ok(p)?;
        match self.nodes.get(p) {
            None | Some(Node::Symlink(_)) => Err(libc::ENOENT),
            Some(Node::Dir) => Err(libc::EISDIR),
            Some(Node::File(id)) => Ok(self.files.get_mut(id).expect("file content")),
        }
    }

    fn view(&self) -> BTreeMap<String, View> {
        let nlink = |id: &u32| {
            self.nodes
                .values()
                .filter(|n| **n == Node::File(*id))
                .count() as u64
        };
        self.nodes
            .iter()
            .map(|(k, n)| {
                let v = match n {
                    Node::File(id) => View::File {
                        data: self.files[id].clone(),
                        nlink: nlink(id),
                    },
                    Node::Dir => View::Dir,
                    Node::Symlink(t) => View::Symlink(t.clone()),
                };
                (k.clone(), v)
            })
            .collect()
    }

    fn apply(&mut self, op: &Op) -> Res {
        match op {
            Op::WriteNew(p, d) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                match self.nodes.get(p) {
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::Symlink(_)) => Err(libc::ENOENT),
                    Some(Node::File(id)) => {
                        self.files.insert(*id, d.clone());
                        Ok(())
                    }
                    None => {
                        self.next_id += 1;
                        self.files.insert(self.next_id, d.clone());
                        self.nodes.insert(p.into(), Node::File(self.next_id));
                        Ok(())
                    }
                }
            }
            Op::WriteAt(p, off, d) => {
                let cur = self.open_file(PATHS[*p])?;
                let off = *off as usize;
                if !d.is_empty() {
                    if cur.len() < off + d.len() {
                        cur.resize(off + d.len(), 0);
                    }
                    cur[off..off + d.len()].copy_from_slice(d);
                }
                Ok(())
            }
            Op::Truncate(p, n) => {
                self.open_file(PATHS[*p])?.resize(*n as usize, 0);
                Ok(())
            }
            Op::Unlink(p) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                match self.nodes.get(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(_) => {
                        self.nodes.remove(p);
                        Ok(())
                    }
                }
            }
            Op::Mkdir(p) => {
                let p = PATHS[*p];
                if self.nodes.contains_key(p) {
                    return Err(libc::EEXIST);
                }
                self.parent_ok(p)?;
                self.nodes.insert(p.into(), Node::Dir);
                Ok(())
            }
            Op::Rmdir(p) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                match self.nodes.get(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::File(_) | Node::Symlink(_)) => Err(libc::ENOTDIR),
                    Some(Node::Dir) if self.children(p) => Err(libc::ENOTEMPTY),
                    Some(Node::Dir) => {
                        self.nodes.remove(p);
                        Ok(())
                    }
                }
            }
            Op::Rename(a, b) => {
                let (a, b) = (PATHS[*a], PATHS[*b]);
                // The kernel resolves both parent paths before it looks at the source.
                self.parent_ok(a)?;
                self.parent_ok(b)?;
                let src = self.nodes.get(a).cloned().ok_or(libc::ENOENT)?;
                if a == b {
                    return Ok(());
                }
                match (&src, self.nodes.get(b)) {
                    // Two names of one file: rename does nothing.
                    (Node::File(x), Some(Node::File(y))) if x == y => return Ok(()),
                    (Node::Dir, Some(Node::File(_) | Node::Symlink(_))) => {
                        return Err(libc::ENOTDIR)
                    }
                    (Node::File(_) | Node::Symlink(_), Some(Node::Dir)) => {
                        return Err(libc::EISDIR)
                    }
                    (Node::Dir, Some(Node::Dir)) if self.children(b) => {
                        return Err(libc::ENOTEMPTY)
                    }
                    _ => {}
                }
                // Move the node and, for a directory, its whole subtree.
                self.nodes.remove(b);
                let moved: Vec<(String, Node)> = self
                    .nodes
                    .iter()
                    .filter(|(k, _)| *k == a || k.starts_with(&format!("{a}/")))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for (k, v) in moved {
                    self.nodes.remove(&k);
                    self.nodes.insert(format!("{b}{}", &k[a.len()..]), v);
                }
                Ok(())
            }
            Op::Link(a, b) => {
                let (a, b) = (PATHS[*a], PATHS[*b]);
                // linkat resolves the old name first, then creates the new one.
                self.parent_ok(a)?;
                let src = self.nodes.get(a).cloned().ok_or(libc::ENOENT)?;
                self.parent_ok(b)?;
                if self.nodes.contains_key(b) {
                    return Err(libc::EEXIST);
                }
                if src == Node::Dir {
                    return Err(libc::EPERM);
                }
                self.nodes.insert(b.into(), src);
                Ok(())
            }
            Op::Symlink(p) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                if self.nodes.contains_key(p) {
                    return Err(libc::EEXIST);
                }
                self.nodes
                    .insert(p.into(), Node::Symlink(LINK_TARGET.into()));
                Ok(())
            }
            Op::Remount => Ok(()),
        }
    }
}

/// Ancestor renames hit the kernel's own EINVAL/ENOTEMPTY traps first; the POSIX suite
/// covers those, so the model skips them.
fn skip(op: &Op) -> bool {
    match op {
        Op::Rename(a, b) => {
            let (a, b) = (PATHS[*a], PATHS[*b]);
            a != b && (b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/")))
        }
        _ => false,
    }
}

fn errno_of(r: std::io::Result<()>) -> Res {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn perform(root: &Path, op: &Op) -> Res {
    let p = |i: &usize| root.join(PATHS[*i]);
    errno_of(match op {
        Op::WriteNew(i, d) => fs::File::create(p(i)).and_then(|mut f| f.write_all(d)),
        Op::WriteAt(i, off, d) => OpenOptions::new()
            .write(true)
            .open(p(i))
            .and_then(|f| f.write_all_at(d, u64::from(*off))),
        Op::Truncate(i, n) => OpenOptions::new()
            .write(true)
            .open(p(i))
            .and_then(|f| f.set_len(u64::from(*n))),
        Op::Unlink(i) => fs::remove_file(p(i)),
        Op::Mkdir(i) => fs::create_dir(p(i)),
        Op::Rmdir(i) => fs::remove_dir(p(i)),
        Op::Rename(a, b) => fs::rename(p(a), p(b)),
        Op::Link(a, b) => fs::hard_link(p(a), p(b)),
        Op::Symlink(i) => std::os::unix::fs::symlink(LINK_TARGET, p(i)),
        Op::Remount => Ok(()),
    })
}

fn snapshot(root: &Path) -> BTreeMap<String, View> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let ft = e.file_type().unwrap();
            let v = if ft.is_dir() {
                stack.push(e.path());
                View::Dir
            } else if ft.is_symlink() {
                View::Symlink(
                    fs::read_link(e.path())
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string(),
                )
            } else {
                let nlink = fs::symlink_metadata(e.path()).unwrap().nlink();
                View::File {
                    data: fs::read(e.path()).unwrap(),
                    nlink,
                }
            };
            out.insert(rel, v);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn mount_behaves_like_the_reference_model(ops in prop::collection::vec(op(), 1..40)) {
        let mut m = common::Mount::new("32M", "");
        let mut model = Model::default();
        for (i, op) in ops.iter().enumerate() {
            if skip(op) {
                continue;
            }
            if let Op::Remount = op {
                m.unmount();
                m.mount("");
            }
            let want = model.apply(op);
            let got = perform(&m.dir, op);
            prop_assert_eq!(got, want, "step {}: {:?}", i, op);
            prop_assert_eq!(snapshot(&m.dir), model.view(), "tree after step {}: {:?}", i, op);
        }
        m.unmount();
        let (code, out) = common::fsck(&m.image, "-n");
        prop_assert_eq!(code, 0, "{}", out);
    }
}
