//! A TCP proxy that delays what it forwards: put between members (each
//! advertising the proxy's port to its peers, see
//! `Cluster::start_with_peers_behind`), it delays every peer message, both
//! ways, by what `Delay` says at the moment it is read, keeping the order
//! within a connection (no netem on this machine's kernel). A jitter makes
//! messages on different connections overtake each other, and `Delay::cut`
//! breaks a connection as a network that drops it would: the member that
//! dialled sees it end at once, and what the proxy had read and not yet
//! forwarded is either lost or still delivered, later still, after the
//! first messages of the connection that replaces it if that is quick.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::rng::Rng;

/// The delay every proxy applies now, and how many chunks they delayed.
#[derive(Default)]
pub struct Delay {
    millis: AtomicU64,
    /// Up to this much more for each chunk, at random.
    jitter_millis: AtomicU64,
    delayed: AtomicU64,
    /// The connections open through every proxy that shares this.
    connections: Mutex<Vec<Connection>>,
    cuts: AtomicU64,
    /// Numbers the connections, in the order they were accepted.
    accepted: AtomicU64,
    /// Chunks of cut connections delivered after a chunk of a connection
    /// accepted since the cut.
    reordered: AtomicU64,
}

/// What became of a connection.
const OPEN: u8 = 0;
/// Cut; what was read is still forwarded, late, the dialler's side is
/// closed.
const DRAINING: u8 = 1;
/// Cut; what was read and not forwarded is lost.
const RESET: u8 = 2;

struct Connection {
    /// The dialling member's side.
    inbound: TcpStream,
    /// The listening member's side.
    outbound: TcpStream,
    state: Arc<AtomicU8>,
    /// Until either side ends it.
    open: Arc<AtomicBool>,
    /// How many connections had been accepted when it was cut.
    cut_after: Arc<AtomicU64>,
    /// How much later than planned what it still holds is delivered.
    held_millis: Arc<AtomicU64>,
}

impl Delay {
    pub fn set(&self, delay: Duration) {
        self.millis
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Each chunk read from now on waits up to `jitter` more, at random,
    /// but never overtakes one read before it on its connection.
    pub fn set_jitter(&self, jitter: Duration) {
        self.jitter_millis
            .store(jitter.as_millis() as u64, Ordering::SeqCst);
    }

    /// Chunks forwarded late so far.
    pub fn delayed(&self) -> u64 {
        self.delayed.load(Ordering::SeqCst)
    }

    /// Cuts one of the open connections, chosen by `pick(n)` (in 0..n):
    /// the dialling member's side is closed at once; what the proxy holds
    /// for the other side is lost, or with `late` still delivered, that
    /// much later than planned (stuck in the network). False if no
    /// connection was open.
    pub fn cut(&self, pick: impl FnOnce(usize) -> usize, late: Option<Duration>) -> bool {
        let drain = late.is_some();
        let mut connections = self.connections.lock().expect("the proxies' connections");
        connections.retain(|c| c.open.load(Ordering::SeqCst));
        if connections.is_empty() {
            return false;
        }
        let n = connections.len();
        let c = connections.swap_remove(pick(n) % n);
        c.cut_after
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
        c.held_millis
            .store(late.map_or(0, |d| d.as_millis() as u64), Ordering::SeqCst);
        c.state
            .store(if drain { DRAINING } else { RESET }, Ordering::SeqCst);
        let _ = c.inbound.shutdown(Shutdown::Both);
        if !drain {
            let _ = c.outbound.shutdown(Shutdown::Both);
        }
        self.cuts.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }

    /// Chunks read before their connection was cut that reached the
    /// listening member after a chunk of a connection accepted since: sent
    /// earlier, overtaken by one sent later on another connection.
    pub fn reordered(&self) -> u64 {
        self.reordered.load(Ordering::SeqCst)
    }
}

/// One proxy: a listener thread and two threads per direction of each
/// connection; all end when it is dropped.
pub struct DelayProxy {
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl DelayProxy {
    /// Forwards 127.0.0.1:`listen` to 127.0.0.1:`upstream`.
    pub fn start(listen: u16, upstream: u16, delay: Arc<Delay>) -> DelayProxy {
        let listener = TcpListener::bind(("127.0.0.1", listen)).expect("bind the delaying proxy");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop2, sockets2) = (stop.clone(), sockets.clone());
        // The newest connection whose chunk reached `upstream`.
        let newest = Arc::new(AtomicU64::new(0));
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = inbound.set_nonblocking(false);
                // A member that is down refuses: so does the proxy.
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let mut open = sockets2.lock().expect("the proxy's sockets");
                for s in [&inbound, &outbound] {
                    if let Ok(s) = s.try_clone() {
                        open.push(s);
                    }
                }
                let state = Arc::new(AtomicU8::new(OPEN));
                let alive = Arc::new(AtomicBool::new(true));
                let cut_after = Arc::new(AtomicU64::new(u64::MAX));
                let held_millis = Arc::new(AtomicU64::new(0));
                if let (Ok(i), Ok(o)) = (inbound.try_clone(), outbound.try_clone()) {
                    let mut connections =
                        delay.connections.lock().expect("the proxies' connections");
                    // Closed ones would hold their descriptors for ever.
                    connections.retain(|c| c.open.load(Ordering::SeqCst));
                    connections.push(Connection {
                        inbound: i,
                        outbound: o,
                        state: state.clone(),
                        open: alive.clone(),
                        cut_after: cut_after.clone(),
                        held_millis: held_millis.clone(),
                    });
                }
                let number = delay.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let seed = (u64::from(listen) << 32) ^ number;
                let ends = Ends {
                    delay: delay.clone(),
                    state,
                    open: alive,
                    cut_after,
                    held_millis,
                };
                pump(
                    &inbound,
                    &outbound,
                    ends.clone(),
                    Some((number, newest.clone())),
                    Rng(seed),
                );
                pump(&outbound, &inbound, ends, None, Rng(!seed));
            }
        });
        DelayProxy { stop, sockets }
    }
}

/// What both directions of a connection share.
#[derive(Clone)]
struct Ends {
    delay: Arc<Delay>,
    state: Arc<AtomicU8>,
    open: Arc<AtomicBool>,
    cut_after: Arc<AtomicU64>,
    held_millis: Arc<AtomicU64>,
}

/// Forwards `from` to `to`, each chunk `Delay` (and some jitter) later than
/// it was read, never before the chunk ahead of it. Towards the listening
/// member, `order` is the connection's number and the newest one that
/// reached it.
fn pump(
    from: &TcpStream,
    to: &TcpStream,
    ends: Ends,
    order: Option<(u64, Arc<AtomicU64>)>,
    mut rng: Rng,
) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (chunks, late) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = ends.clone();
    std::thread::spawn(move || {
        let delay = &reader.delay;
        let mut buf = vec![0; 1 << 16];
        let mut last = Instant::now();
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut millis = delay.millis.load(Ordering::SeqCst);
            let jitter = delay.jitter_millis.load(Ordering::SeqCst);
            if jitter > 0 {
                millis += rng.below(jitter + 1);
            }
            if millis > 0 {
                delay.delayed.fetch_add(1, Ordering::SeqCst);
            }
            last = last.max(Instant::now() + Duration::from_millis(millis));
            if chunks.send((last, buf[..n].to_vec())).is_err() {
                break;
            }
        }
        reader.open.store(false, Ordering::SeqCst);
    });
    std::thread::spawn(move || {
        for (at, bytes) in late {
            let held = Duration::from_millis(ends.held_millis.load(Ordering::SeqCst));
            std::thread::sleep((at + held).saturating_duration_since(Instant::now()));
            if ends.state.load(Ordering::SeqCst) == RESET || to.write_all(&bytes).is_err() {
                break;
            }
            if let Some((number, newest)) = &order
                && newest.fetch_max(*number, Ordering::SeqCst)
                    > ends.cut_after.load(Ordering::SeqCst)
            {
                ends.delay.reordered.fetch_add(1, Ordering::SeqCst);
            }
        }
        ends.open.store(false, Ordering::SeqCst);
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.sockets.lock().expect("the proxy's sockets").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
