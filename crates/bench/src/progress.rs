//! A progress bar on stderr, drawn only when stderr is a terminal.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WIDTH: u64 = 40;
const REDRAW: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct State {
    total: u64,
    done: AtomicU64,
    started: Instant,
}

/// Counts finished requests; a ticker task redraws the bar.
#[derive(Debug)]
pub struct Progress {
    state: Arc<State>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts counting towards `total`; draws only if stderr is a terminal.
    pub fn start(total: u64) -> Progress {
        let state = Arc::new(State {
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
        });
        let ticker = std::io::stderr().is_terminal().then(|| {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REDRAW);
                loop {
                    tick.tick().await;
                    draw(&state, false);
                }
            })
        });
        Progress { state, ticker }
    }

    pub fn counter(&self) -> Counter {
        Counter(self.state.clone())
    }

    /// Draws the final state and ends the line.
    pub fn finish(self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
            draw(&self.state, true);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
        }
    }
}

/// A handle for workers to count what they finished.
#[derive(Clone, Debug)]
pub struct Counter(Arc<State>);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
    }
}

fn draw(state: &State, last: bool) {
    let line = render(
        state.done.load(Ordering::Relaxed),
        state.total,
        state.started.elapsed(),
    );
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r{line}");
    if last {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}

/// `[====>     ] done/total pct% rate/s` for the bar's current state.
pub fn render(done: u64, total: u64, elapsed: Duration) -> String {
    let done = done.min(total);
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let mut bar = "=".repeat(filled as usize);
    if filled < WIDTH {
        bar.push('>');
        bar.push_str(&" ".repeat((WIDTH - filled - 1) as usize));
    }
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    format!("[{bar}] {done}/{total} {percent}% {rate:.0}/s {secs:.1}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_with_progress() {
        let line = render(0, 100, Duration::from_secs(1));
        assert!(
            line.starts_with(&format!("[>{}]", " ".repeat(39))),
            "{line}"
        );
        let line = render(50, 100, Duration::from_secs(2));
        assert!(
            line.starts_with(&format!(
                "[{}>{}] 50/100 50% 25/s",
                "=".repeat(20),
                " ".repeat(19)
            )),
            "{line}"
        );
        let line = render(100, 100, Duration::from_secs(4));
        assert!(
            line.starts_with(&format!("[{}] 100/100 100%", "=".repeat(40))),
            "{line}"
        );
    }

    #[test]
    fn empty_total_is_complete() {
        assert!(render(0, 0, Duration::ZERO).contains("0/0 100%"));
    }
}
