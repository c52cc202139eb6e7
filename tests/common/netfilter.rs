//! Network faults with iptables (the tests run as root): cutting a member
//! off in one direction (every packet to its peer port dropped, so it still
//! sends to the others but hears nothing back: the "leader that can send
//! but not receive" that has stalled other raft implementations), and
//! dropping a share of a port's packets both ways, and the other direction:
//! a member whose packets to its peers are dropped while it still hears
//! them. (Delays would need netem, which not every kernel has.)

use std::process::{Command, Stdio};

/// Packets to a port on loopback dropped while this lives.
pub struct Deaf {
    port: u16,
}

impl Deaf {
    /// None when iptables cannot be used here (not root, no netfilter).
    pub fn port(port: u16) -> Option<Deaf> {
        rule("-A", port).then_some(Deaf { port })
    }
}

impl Drop for Deaf {
    fn drop(&mut self) {
        rule("-D", self.port);
    }
}

/// A share of the packets to and from a port on loopback dropped while
/// this lives.
pub struct Lossy {
    rules: Vec<Vec<String>>,
}

impl Lossy {
    /// Drops `percent` of the packets to and from `port`; None when
    /// iptables cannot be used here.
    pub fn port(port: u16, percent: u32) -> Option<Lossy> {
        let probability = format!("{:.2}", f64::from(percent) / 100.0);
        let rules: Vec<Vec<String>> = ["--dport", "--sport"]
            .into_iter()
            .map(|side| {
                [
                    "INPUT",
                    "-i",
                    "lo",
                    "-p",
                    "tcp",
                    side,
                    &port.to_string(),
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ]
                .map(String::from)
                .to_vec()
            })
            .collect();
        let mut lossy = Lossy { rules: Vec::new() };
        for rule in rules {
            if !iptables("-A", &rule) {
                return None;
            }
            lossy.rules.push(rule);
        }
        Some(lossy)
    }
}

impl Lossy {
    /// Packets dropped so far by this loss's rules.
    pub fn dropped(&self) -> u64 {
        let Ok(out) = Command::new("iptables")
            .args(["-w", "-L", "INPUT", "-v", "-x", "-n"])
            .output()
        else {
            return 0;
        };
        let listing = String::from_utf8_lossy(&out.stdout);
        self.rules
            .iter()
            .filter_map(|rule| {
                let side = if rule.contains(&"--dport".to_string()) {
                    "dpt"
                } else {
                    "spt"
                };
                let port = rule.get(6)?;
                let wanted = format!("tcp {side}:{port} statistic");
                listing
                    .lines()
                    .find(|line| line.contains(&wanted))
                    .and_then(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            })
            .sum()
    }
}

impl Drop for Lossy {
    fn drop(&mut self) {
        for rule in &self.rules {
            iptables("-D", rule);
        }
    }
}

/// A process that can receive but not send to some ports on loopback while
/// this lives: it goes into a cgroup of its own, whose packets to those
/// ports the OUTPUT chain drops, and its connections to them are cut (`ss
/// -K`) so that it opens them again from there. Connections others opened
/// to it still deliver (its ACKs go out), but what it sends on its own
/// connections to those ports is lost.
pub struct Mute {
    pid: u32,
    root: std::path::PathBuf,
    cgroup: String,
    rules: Vec<Vec<String>>,
}

impl Mute {
    /// Mutes `pid` towards `ports`; None when cgroup v2 or iptables' cgroup
    /// match cannot be used here.
    pub fn process(pid: u32, ports: &[u16]) -> Option<Mute> {
        // The cgroup v2 hierarchy: the whole of /sys/fs/cgroup, or its
        // "unified" part beside v1's controllers.
        let root = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            std::path::PathBuf::from("/sys/fs/cgroup")
        } else {
            std::path::PathBuf::from("/sys/fs/cgroup/unified")
        };
        if !root.join("cgroup.procs").exists() {
            return None;
        }
        let cgroup = format!("cairn-mute-{pid}");
        std::fs::create_dir(root.join(&cgroup)).ok()?;
        let mut mute = Mute {
            pid,
            root,
            cgroup,
            rules: Vec::new(),
        };
        std::fs::write(
            mute.root.join(&mute.cgroup).join("cgroup.procs"),
            pid.to_string(),
        )
        .ok()?;
        for port in ports {
            let rule: Vec<String> = [
                "OUTPUT",
                "-o",
                "lo",
                "-m",
                "cgroup",
                "--path",
                &mute.cgroup,
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "DROP",
            ]
            .map(String::from)
            .to_vec();
            if !iptables("-A", &rule) {
                return None;
            }
            mute.rules.push(rule);
        }
        // A socket belongs to the cgroup it was created in: the process's
        // connections opened before the move are cut, so that it opens
        // them again from inside its cgroup.
        let filter = ports
            .iter()
            .map(|p| format!("dport = :{p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let listing = Command::new("ss")
            .args(["-tnpH", "state", "established", &format!("( {filter} )")])
            .output()
            .ok()?;
        let owner = format!("pid={pid},");
        for line in String::from_utf8_lossy(&listing.stdout)
            .lines()
            .filter(|l| l.contains(&owner))
        {
            let local_port = line
                .split_whitespace()
                .find(|field| field.starts_with("127.0.0.1:"))
                .and_then(|addr| addr.rsplit(':').next())?;
            let killed = Command::new("ss")
                .args(["-K", "-tn", &format!("( sport = :{local_port} )")])
                .stdout(Stdio::null())
                .status()
                .ok()?;
            if !killed.success() {
                return None;
            }
        }
        Some(mute)
    }
}

impl Drop for Mute {
    fn drop(&mut self) {
        for rule in &self.rules {
            iptables("-D", rule);
        }
        // Back to the root cgroup (fails harmlessly if the process is gone),
        // then the emptied cgroup can go.
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(self.root.join(&self.cgroup));
    }
}

/// Whether this machine lets the tests change its packet filter.
pub fn available() -> bool {
    // Port 9 (discard) is nobody's peer port in these tests.
    Deaf::port(9).is_some()
}

fn rule(action: &str, port: u16) -> bool {
    let port = port.to_string();
    let rule = [
        "INPUT", "-i", "lo", "-p", "tcp", "--dport", &port, "-j", "DROP",
    ];
    iptables(action, &rule.map(String::from))
}

fn iptables(action: &str, rule: &[String]) -> bool {
    Command::new("iptables")
        .args(["-w", action])
        .args(rule)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
