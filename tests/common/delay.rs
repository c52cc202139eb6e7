//! A TCP proxy that delays what it forwards: put between members (each
//! advertising the proxy's port to its peers, see
//! `Cluster::start_with_peers_behind`), it delays every peer message, both
//! ways, by what `Delay` says at the moment it is read, keeping the order
//! within a connection (no netem on this machine's kernel).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The delay every proxy applies now, and how many chunks they delayed.
#[derive(Default)]
pub struct Delay {
    millis: AtomicU64,
    delayed: AtomicU64,
}

impl Delay {
    pub fn set(&self, delay: Duration) {
        self.millis
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Chunks forwarded late so far.
    pub fn delayed(&self) -> u64 {
        self.delayed.load(Ordering::SeqCst)
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
                pump(&inbound, &outbound, delay.clone());
                pump(&outbound, &inbound, delay.clone());
            }
        });
        DelayProxy { stop, sockets }
    }
}

/// Forwards `from` to `to`, each chunk `Delay` later than it was read.
fn pump(from: &TcpStream, to: &TcpStream, delay: Arc<Delay>) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (chunks, late) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0; 1 << 16];
        let mut last = Instant::now();
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let millis = delay.millis.load(Ordering::SeqCst);
            if millis > 0 {
                delay.delayed.fetch_add(1, Ordering::SeqCst);
            }
            // Never before the chunk ahead of it.
            last = last.max(Instant::now() + Duration::from_millis(millis));
            if chunks.send((last, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (at, bytes) in late {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
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
