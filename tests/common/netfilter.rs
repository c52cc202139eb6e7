//! Network faults with iptables (the tests run as root): cutting a member
//! off in one direction (every packet to its peer port dropped, so it still
//! sends to the others but hears nothing back: the "leader that can send
//! but not receive" that has stalled other raft implementations), and
//! dropping a share of a port's packets both ways. (Delays would need
//! netem, which not every kernel has.)

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
