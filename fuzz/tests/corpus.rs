//! Stable-toolchain replay of every fuzz target: the committed corpus (fuzz/corpus/<target>/)
//! plus seeded random and mutated inputs. A crash prints the target, the seed and the input.

use rand::{Rng, SeedableRng};
use std::path::Path;

const RANDOM_INPUTS_PER_TARGET: usize = 3000;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.path().is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                out.push((name, std::fs::read(e.path()).expect("read corpus file")));
            }
        }
    }
    out.sort();
    out
}

fn mutate(rng: &mut rand::rngs::StdRng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    match rng.gen_range(0..4) {
        0 if !v.is_empty() => {
            let i = rng.gen_range(0..v.len());
            v[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if !v.is_empty() => v.truncate(rng.gen_range(0..v.len())),
        2 => v.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>())),
        _ => {
            let n = rng.gen_range(0..512);
            v = (0..n).map(|_| rng.gen()).collect();
        }
    }
    v
}

#[test]
fn every_target_survives_corpus_and_random_inputs() {
    // Every input runs and every failure is listed at the end, so each unfixed finding
    // (`finding-*` files, see docs/TESTING.md) is named, not just the first.
    let mut failed = Vec::new();
    for (name, f) in tandem_fuzz::TARGETS {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "fuzz/corpus/{name}/ has no seed files");
        for (file, s) in &seeds {
            if std::panic::catch_unwind(|| f(s)).is_err() {
                failed.push(format!("fuzz/corpus/{name}/{file}"));
            }
        }
        // Mutations start from the seeds, not from reproducers of known findings.
        let seeds: Vec<Vec<u8>> = seeds
            .into_iter()
            .filter(|(file, _)| !file.starts_with("finding-"))
            .map(|(_, s)| s)
            .collect();
        let seed = 0x7A4D_u64 ^ name.len() as u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for i in 0..RANDOM_INPUTS_PER_TARGET {
            let base = &seeds[i % seeds.len()];
            let input = mutate(&mut rng, base);
            if std::panic::catch_unwind(|| f(&input)).is_err() {
                failed.push(format!(
                    "target {name} panicked (seed {seed}, input {input:02x?})"
                ));
            }
        }
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:#?}");
}

/// The whole-image targets patch bytes of images built at run time; a corpus file (or a
/// crash input with a forged checksum) means the same thing in every process only if
/// those images are byte-identical every time.
#[test]
fn fs_fuzz_images_are_deterministic() {
    use tandem_fuzz::fs_image;
    let (a, b) = (fs_image::build_fsck_base(), fs_image::build_fsck_base());
    assert!(
        a.image == b.image,
        "fs_image_fsck base image differs between builds"
    );
    assert_eq!(a.meta, b.meta);
    let (a, b) = (
        fs_image::build_journal_base(),
        fs_image::build_journal_base(),
    );
    assert!(
        a.image == b.image,
        "fs_journal_replay base image differs between builds"
    );
    assert!(a.expected == b.expected);
}
