//! Cutting a member off in one direction with iptables (the tests run as
//! root): every packet to its peer port is dropped, so it still sends to
//! the others but hears nothing back: the "leader that can send but not
//! receive" that has stalled other raft implementations.

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

/// Whether this machine lets the tests change its packet filter.
pub fn available() -> bool {
    // Port 9 (discard) is nobody's peer port in these tests.
    Deaf::port(9).is_some()
}

fn rule(action: &str, port: u16) -> bool {
    Command::new("iptables")
        .args(["-w", action, "INPUT", "-i", "lo", "-p", "tcp", "--dport"])
        .arg(port.to_string())
        .args(["-j", "DROP"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
