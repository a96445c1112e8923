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
    Remount,
}

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
        2 => (p.clone(), p).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => Just(Op::Remount),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

/// The reference: a map from path to node, with POSIX error rules.
#[derive(Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
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
                    None => Err(libc::ENOENT),
                }
            }
        }
    }

    fn children(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.nodes.keys().any(|k| k.starts_with(&prefix))
    }

    fn apply(&mut self, op: &Op) -> Res {
        match op {
            Op::WriteNew(p, d) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                match self.nodes.get(p) {
                    Some(Node::Dir) => Err(libc::EISDIR),
                    _ => {
                        self.nodes.insert(p.into(), Node::File(d.clone()));
                        Ok(())
                    }
                }
            }
            Op::WriteAt(p, off, d) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                match self.nodes.get_mut(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(cur)) => {
                        let off = *off as usize;
                        if !d.is_empty() {
                            if cur.len() < off + d.len() {
                                cur.resize(off + d.len(), 0);
                            }
                            cur[off..off + d.len()].copy_from_slice(d);
                        }
                        Ok(())
                    }
                }
            }
            Op::Truncate(p, n) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                match self.nodes.get_mut(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(cur)) => {
                        cur.resize(*n as usize, 0);
                        Ok(())
                    }
                }
            }
            Op::Unlink(p) => {
                let p = PATHS[*p];
                self.parent_ok(p)?;
                match self.nodes.get(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(_)) => {
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
                    Some(Node::File(_)) => Err(libc::ENOTDIR),
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
                    (Node::Dir, Some(Node::File(_))) => return Err(libc::ENOTDIR),
                    (Node::File(_), Some(Node::Dir)) => return Err(libc::EISDIR),
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
        Op::Remount => Ok(()),
    })
}

fn snapshot(root: &Path) -> BTreeMap<String, Node> {
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
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, Node::Dir);
                stack.push(e.path());
            } else {
                out.insert(rel, Node::File(fs::read(e.path()).unwrap()));
            }
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
            prop_assert_eq!(snapshot(&m.dir), model.nodes.clone(), "tree after step {}: {:?}", i, op);
        }
        m.unmount();
        let (code, out) = common::fsck(&m.image, "-n");
        prop_assert_eq!(code, 0, "{}", out);
    }
}
