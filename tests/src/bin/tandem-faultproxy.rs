//! tandem-faultproxy: a transparent TCP proxy that delays traffic, for the fault-injection
//! tests. This machine's kernel has no `sch_netem`, so delay and jitter are added here
//! while nftables drops packets (see `Cluster::impair_network`).
//!
//! Inside a node's network namespace, an nftables `redirect` sends every outgoing TCP
//! connection to another node to this proxy; it reads the original destination
//! (`SO_ORIGINAL_DST`), connects there itself (its socket carries `SO_MARK`
//! [`BYPASS_MARK`] so the redirect skips it) and forwards both directions. Each chunk it
//! reads is held for `delay + random(0..=jitter)` before it is written on, never
//! overtaking the chunk before it: a TCP stream stays in order, but every connection
//! gets its own jitter, so messages on different connections are reordered against
//! each other. Memory is bounded: at most [`QUEUE_CHUNKS`] chunks wait per direction.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::{Rng, SeedableRng};

/// The packet mark of the proxy's own connections (the nftables rule lets them pass).
pub const BYPASS_MARK: u32 = 0x7a7a;
const QUEUE_CHUNKS: usize = 256;
const CHUNK_BYTES: usize = 64 << 10;

#[derive(Parser)]
#[command(about = "Transparent TCP proxy adding delay and jitter (tests only)")]
struct Args {
    /// Port to listen on (the nftables redirect target).
    #[arg(long)]
    port: u16,
    /// Fixed one-way delay added to every chunk, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Extra random delay per chunk, uniform in 0..=jitter, in milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Seed of the jitter sequence (each connection derives its own from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(("0.0.0.0", args.port))
        .with_context(|| format!("cannot listen on port {}", args.port))?;
    eprintln!(
        "faultproxy: listening on {}, delay {} ms + jitter 0..={} ms",
        args.port, args.delay_ms, args.jitter_ms
    );
    for (n, conn) in listener.incoming().enumerate() {
        let Ok(client) = conn else { continue };
        let (delay, jitter, seed) = (args.delay_ms, args.jitter_ms, args.seed);
        std::thread::spawn(move || {
            if let Err(e) = proxy(client, delay, jitter, seed.wrapping_add(n as u64 * 7919)) {
                eprintln!("faultproxy: connection {n}: {e:#}");
            }
        });
    }
    Ok(())
}

fn proxy(client: TcpStream, delay_ms: u64, jitter_ms: u64, seed: u64) -> anyhow::Result<()> {
    let dst = original_dst(&client)?;
    let upstream = connect_marked(dst).with_context(|| format!("connect to {dst}"))?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let pumps = [
        (client.try_clone()?, upstream.try_clone()?, seed),
        (upstream, client, seed ^ 0x5555),
    ];
    let handles: Vec<_> = pumps
        .into_iter()
        .map(|(from, to, seed)| {
            std::thread::spawn(move || pump(from, to, delay_ms, jitter_ms, seed))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Copies `from` to `to`, holding each chunk until its due time.
fn pump(mut from: TcpStream, to: TcpStream, delay_ms: u64, jitter_ms: u64, seed: u64) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let writer = {
        let mut to = to.try_clone().expect("clone socket");
        std::thread::spawn(move || {
            for (due, chunk) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write_all(&chunk).is_err() {
                    return false;
                }
            }
            true
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut last_due = Instant::now();
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let hold = Duration::from_millis(delay_ms + rng.gen_range(0..=jitter_ms));
        let due = (Instant::now() + hold).max(last_due);
        last_due = due;
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let clean = writer.join().unwrap_or(false);
    // Pass the end of the stream on (or the failure, as a full close).
    let _ = to.shutdown(if clean {
        Shutdown::Write
    } else {
        Shutdown::Both
    });
    let _ = from.shutdown(Shutdown::Read);
}

/// The destination the connection had before the nftables redirect.
fn original_dst(s: &TcpStream) -> anyhow::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writing and describe a sockaddr_in.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!(
            "SO_ORIGINAL_DST: {} (not a redirected connection?)",
            std::io::Error::last_os_error()
        );
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// Connects with `SO_MARK` set before the SYN, so the redirect rule lets it through.
fn connect_marked(dst: SocketAddrV4) -> anyhow::Result<TcpStream> {
    // SAFETY: plain socket calls on a descriptor we own; it is wrapped (and so closed)
    // right after creation.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let mark = BYPASS_MARK;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        ) != 0
        {
            bail!("SO_MARK: {}", std::io::Error::last_os_error());
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: dst.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*dst.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            bail!("{}", std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}
