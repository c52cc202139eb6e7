//! A replicated counter on cairn-consensus: each proposal adds a number; the
//! total and the applied index live in one file, replaced atomically, so a
//! restart resumes exactly where it stopped.
//!
//!     cargo run -p cairn-consensus --example counter -- /tmp/counter 5
//!
//! Run it twice with the same directory: the total keeps growing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_consensus::{BoxError, Committed, Node, NodeConfig, SnapshotSource, StateMachine};

struct Counter {
    file: PathBuf,
    applied: u64,
    total: u64,
    /// What a snapshot sent to a peer would hold.
    latest: Arc<Mutex<(u64, u64)>>,
}

struct CounterSnapshots(Arc<Mutex<(u64, u64)>>);

impl SnapshotSource for CounterSnapshots {
    fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
        let (applied, total) = *self.0.lock().expect("no panic while holding the lock");
        write!(out, "{applied} {total}")?;
        Ok(applied)
    }
}

fn parse(text: &str) -> Result<(u64, u64), CounterError> {
    let bad = || CounterError::BadFile(text.to_owned());
    let (a, t) = text.trim().split_once(' ').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, t.parse().map_err(|_| bad())?))
}

impl Counter {
    fn open(file: PathBuf) -> Result<Self, BoxError> {
        let (applied, total) = match std::fs::read_to_string(&file) {
            Ok(text) => parse(&text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(e.into()),
        };
        let latest = Arc::new(Mutex::new((applied, total)));
        Ok(Counter {
            file,
            applied,
            total,
            latest,
        })
    }
}

/// Why the counter failed.
#[derive(Debug, thiserror::Error)]
enum CounterError {
    #[error("counter file: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad counter file: {0:?}")]
    BadFile(String),
    #[error("a proposal is not a big-endian u64")]
    BadProposal,
}

impl StateMachine for Counter {
    type Output = u64;
    type Error = CounterError;

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn apply(
        &mut self,
        entries: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<u64>, CounterError> {
        let mut totals = Vec::with_capacity(entries.len());
        for entry in entries {
            let number = entry.data.as_ref().try_into();
            self.total += u64::from_be_bytes(number.map_err(|_| CounterError::BadProposal)?);
            totals.push(self.total);
        }
        self.applied = applied_index;
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {}", self.applied, self.total))?;
        std::fs::rename(&tmp, &self.file)?;
        *self.latest.lock().expect("no panic while holding the lock") = (self.applied, self.total);
        Ok(totals)
    }

    fn sync(&mut self) -> Result<(), CounterError> {
        std::fs::File::open(&self.file)?.sync_all()?;
        Ok(())
    }

    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(CounterSnapshots(self.latest.clone()))
    }

    fn restore(&mut self, file: &Path) -> Result<(), CounterError> {
        let (applied, total) = parse(&std::fs::read_to_string(file)?)?;
        std::fs::copy(file, &self.file)?;
        (self.applied, self.total) = (applied, total);
        *self.latest.lock().expect("no panic while holding the lock") = (applied, total);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "counter-data".into()));
    let add: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1);
    std::fs::create_dir_all(&dir)?;
    let counter = Counter::open(dir.join("counter"))?;
    let node = Node::start(NodeConfig::single(1, dir.join("raft")), counter)?;
    node.wait_leader(std::time::Duration::from_secs(5)).await;
    let total = node.propose(add.to_be_bytes().to_vec()).await?;
    tracing::info!(total, "added {add}");
    node.shutdown();
    Ok(())
}
