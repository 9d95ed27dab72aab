//! Hosts for partition tests: a [`Host`] is a network namespace joined to the test's own
//! namespace by veth pairs, one per link. A process started in it ([`Host::command`])
//! reaches the rest of the machine only over those links, so cutting one (the test's end of
//! the pair set down: packets from inside go nowhere, connections time out) partitions it
//! from whatever it reached through that link, and healing joins it again; all on one
//! machine, without a network. Needs root (CAP_NET_ADMIN) and iproute2's `ip`.
//!
//! Link `l` of the host with index `h` is the /30 `10.213.h.(4l)`: the test's end is
//! `.(4l+1)` ([`Host::outside`]), the host's end `.(4l+2)` ([`Host::inside`]). Hosts reach
//! each other only if routed so ([`Host::route_hosts_via`]): through the test's namespace,
//! which then forwards between them, over one link of each, so cutting that link cuts the
//! host off from the others too. Indexes are
//! claimed with a flock-ed file each in `/run/lock`, so concurrent test processes never share
//! one, and a claim whose process died is taken over with whatever it left behind deleted.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::flock;

/// Where the claims of host indexes are (root's, like the namespaces).
const CLAIMS: &str = "/run/lock";
/// Host indexes: the third octet of their addresses.
const INDEXES: u16 = 256;
/// Links per host at most (the fourth octet: 4 per link).
pub const MAX_LINKS: u8 = 16;

/// A network namespace with veth links to the test's namespace. Dropping it deletes the
/// namespace and its links, ending nothing: processes started in it are the test's to kill.
pub struct Host {
    index: u8,
    links: u8,
    /// Holds the flock on the index until the namespace is gone.
    _claim: File,
}

impl Host {
    /// Makes a host with `links` links, all up.
    pub fn create(links: u8) -> Result<Host> {
        anyhow::ensure!((1..=MAX_LINKS).contains(&links), "a host has 1 to {MAX_LINKS} links");
        let (index, claim) = claim_index()?;
        let host = Host {
            index,
            links,
            _claim: claim,
        };
        let ns = host.name();
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for l in 0..links {
            let (outside, inside) = (host.outside_name(l), format!("l{l}"));
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns,
            ])?;
            ip(&["addr", "add", &format!("{}/30", host.outside(l)), "dev", &outside])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/30", host.inside(l)),
                "dev",
                &inside,
            ])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["link", "set", &outside, "up"])?;
        }
        Ok(host)
    }

    /// The namespace's name (`ip netns exec <name>`).
    pub fn name(&self) -> String {
        namespace(self.index)
    }

    /// The test's end of link `l`: what a process inside reaches over it.
    pub fn outside(&self, l: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 4 * l + 1)
    }

    /// The host's end of link `l`: what the test reaches a process inside at.
    pub fn inside(&self, l: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 4 * l + 2)
    }

    /// Cuts link `l`: nothing crosses it until [`Host::heal`].
    pub fn cut(&self, l: u8) -> Result<()> {
        self.check(l)?;
        ip(&["link", "set", &self.outside_name(l), "down"])
    }

    /// Joins link `l` again.
    pub fn heal(&self, l: u8) -> Result<()> {
        self.check(l)?;
        ip(&["link", "set", &self.outside_name(l), "up"])
    }

    /// Routes what the host sends to other hosts over link `l`, through the test's
    /// namespace, and has that namespace forward between hosts (`net.ipv4.ip_forward`, which
    /// stays on: it is the machine's).
    pub fn route_hosts_via(&self, l: u8) -> Result<()> {
        self.check(l)?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("turning on IPv4 forwarding between hosts (partition tests need root)")?;
        ip(&[
            "-n",
            &self.name(),
            "route",
            "add",
            "10.213.0.0/16",
            "via",
            &self.outside(l).to_string(),
        ])
    }

    /// `program` to be run inside the host (through `ip netns exec`, which execs it, so the
    /// child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name()]).arg(program);
        command
    }

    fn check(&self, l: u8) -> Result<()> {
        anyhow::ensure!(
            l < self.links,
            "host {} has {} links, not {}",
            self.name(),
            self.links,
            l + 1
        );
        Ok(())
    }

    fn outside_name(&self, l: u8) -> String {
        outside_name(self.index, l)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pairs with an end inside it. A failure
        // leaves garbage that the next claim of this index deletes.
        let _ = ip(&["netns", "delete", &self.name()]);
    }
}

fn namespace(index: u8) -> String {
    format!("ferrata-{index}")
}

fn outside_name(index: u8, l: u8) -> String {
    format!("fr{index}l{l}")
}

/// The first index no live process holds, with what a dead holder left deleted.
fn claim_index() -> Result<(u8, File)> {
    for index in 0..INDEXES {
        let index = index as u8;
        // Namespaces are machine-wide, so their claims must be too, whatever TMPDIR says.
        let path = Path::new(CLAIMS).join(format!("ferrata-netns-{index}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            continue;
        }
        // Ours now; a previous holder that died may have left its namespace or, if it died
        // while making them, links whose other end never moved inside. Errors mean there
        // was nothing to delete.
        let _ = ip(&["netns", "delete", &namespace(index)]);
        for l in 0..MAX_LINKS {
            let _ = ip(&["link", "delete", &outside_name(index, l)]);
        }
        return Ok((index, file));
    }
    bail!("all {INDEXES} test hosts are in use")
}

/// Runs `ip args...`, failing with its error output.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {} (partition tests need root and iproute2)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};

    use super::*;

    /// Answers every connection that sends `x` with `y`, until one sends something else.
    fn answering(at: Ipv4Addr) -> Result<(SocketAddr, std::thread::JoinHandle<()>)> {
        let listener = TcpListener::bind((at, 0))?;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut byte = [0];
                if conn.read_exact(&mut byte).is_err() || byte != *b"x" {
                    break;
                }
                let _ = conn.write_all(b"y");
            }
        });
        Ok((addr, server))
    }

    /// Whether a connection from inside the host to `addr` gets its answer (within 1 s).
    fn reaches(host: &Host, addr: SocketAddr) -> Result<bool> {
        let out = host
            .command("python3")
            .args([
                "-c",
                "import socket,sys\n\
                 try:\n  s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1); s.sendall(b'x'); print(s.recv(1))\n\
                 except OSError as e: print('unreachable', e)",
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("b'y'"))
    }

    #[test]
    fn a_cut_link_partitions_the_host_from_what_is_behind_it_until_it_heals() -> Result<()> {
        let host = Host::create(2)?;
        let (first, first_server) = answering(host.outside(0))?;
        let (second, second_server) = answering(host.outside(1))?;
        assert!(reaches(&host, first)?, "link 0 is up");
        host.cut(0)?;
        assert!(!reaches(&host, first)?, "link 0 is cut");
        assert!(reaches(&host, second)?, "link 1 still carries");
        host.heal(0)?;
        assert!(reaches(&host, first)?, "link 0 healed");
        for (addr, server) in [(first, first_server), (second, second_server)] {
            std::net::TcpStream::connect(addr)?.write_all(b"q")?;
            server.join().expect("the answering thread");
        }
        let name = host.name();
        drop(host);
        let out = Command::new("ip").args(["netns", "list"]).output()?;
        assert!(
            !String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "the namespace is deleted"
        );
        Ok(())
    }
}
