//! A replicated counter on cairn-consensus: each proposal adds a number; the
//! total and the applied index live in one file, replaced atomically, so a
//! restart resumes exactly where it stopped.
//!
//!     cargo run -p cairn-consensus --example counter -- /tmp/counter 5
//!
//! Run it twice with the same directory: the total keeps growing.

use std::path::PathBuf;

use cairn_consensus::{BoxError, Committed, Node, NodeConfig, StateMachine};

struct Counter {
    file: PathBuf,
    applied: u64,
    total: u64,
}

impl Counter {
    fn open(file: PathBuf) -> Result<Self, BoxError> {
        let (applied, total) = match std::fs::read_to_string(&file) {
            Ok(text) => {
                let (a, t) = text.trim().split_once(' ').ok_or("bad counter file")?;
                (a.parse()?, t.parse()?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(e.into()),
        };
        Ok(Counter {
            file,
            applied,
            total,
        })
    }
}

impl StateMachine for Counter {
    type Output = u64;

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn apply(&mut self, entries: &[Committed], applied_index: u64) -> Result<Vec<u64>, BoxError> {
        let mut totals = Vec::with_capacity(entries.len());
        for entry in entries {
            self.total += u64::from_be_bytes(entry.data.as_ref().try_into()?);
            totals.push(self.total);
        }
        self.applied = applied_index;
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {}", self.applied, self.total))?;
        std::fs::rename(&tmp, &self.file)?;
        Ok(totals)
    }

    fn sync(&mut self) -> Result<(), BoxError> {
        std::fs::File::open(&self.file)?.sync_all()?;
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
    let total = node.propose(add.to_be_bytes().to_vec()).await?;
    tracing::info!(total, "added {add}");
    node.shutdown();
    Ok(())
}
