//! What the upstream learns about the client: `X-Forwarded-For` and `Forwarded`
//! carry the address the connection came from, never what the client wrote.
//!
//! A client can put anything in these headers, and an upstream (or its logs, or its
//! own rate limiter) may believe them. So the gateway keeps only the entries that
//! trusted proxies in front of it appended (`server.trusted_proxy_hops`, counted from
//! the right, as Envoy's `xff_num_trusted_hops`) and appends the peer it accepted the
//! connection from. With no trusted hops (the default) the upstream sees exactly one
//! address: the peer's. `X-Real-IP` is dropped unless a trusted proxy may have set it.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The address a request's connection came from, put in its extensions by the
/// listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Rewrites the forwarding headers of a request that came from `peer` (when known):
/// the last `trusted_hops` entries of each are kept, the peer appended.
pub fn rewrite(headers: &mut HeaderMap, peer: Option<IpAddr>, trusted_hops: u32) {
    let kept_for = trusted_entries(headers, &X_FORWARDED_FOR, trusted_hops);
    let kept_forwarded = trusted_entries(headers, &FORWARDED, trusted_hops);
    if trusted_hops == 0 {
        headers.remove(X_REAL_IP);
    }
    let Some(peer) = peer else {
        set(headers, X_FORWARDED_FOR, kept_for);
        set(headers, FORWARDED, kept_forwarded);
        return;
    };
    let mut forwarded_for = kept_for;
    forwarded_for.push(peer.to_string());
    set(headers, X_FORWARDED_FOR, forwarded_for);
    if !kept_forwarded.is_empty() {
        let mut forwarded = kept_forwarded;
        forwarded.push(match peer {
            IpAddr::V4(address) => format!("for={address}"),
            IpAddr::V6(address) => format!("for=\"[{address}]\""),
        });
        set(headers, FORWARDED, forwarded);
    }
}

/// Removes every `name` header and returns its last `trusted_hops` comma-separated
/// entries, in order.
fn trusted_entries(headers: &mut HeaderMap, name: &HeaderName, trusted_hops: u32) -> Vec<String> {
    let entries: Vec<String> = headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|entry| entry.trim().to_owned())
        .filter(|entry| !entry.is_empty())
        .collect();
    headers.remove(name);
    let skip = entries.len().saturating_sub(usize::try_from(trusted_hops).unwrap_or(usize::MAX));
    entries.into_iter().skip(skip).collect()
}

fn set(headers: &mut HeaderMap, name: HeaderName, entries: Vec<String>) {
    if entries.is_empty() {
        return;
    }
    if let Ok(value) = HeaderValue::try_from(entries.join(", ")) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7)));

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    fn get<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        headers.get_all(name).iter().filter_map(|value| value.to_str().ok()).collect()
    }

    #[test]
    fn without_trusted_hops_only_the_peer_is_told() {
        let mut sent = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8, 9.9.9.9"),
            ("forwarded", "for=1.2.3.4;proto=https"),
            ("x-real-ip", "1.2.3.4"),
        ]);
        rewrite(&mut sent, PEER, 0);
        assert_eq!(get(&sent, "x-forwarded-for"), ["10.0.0.7"]);
        assert!(get(&sent, "forwarded").is_empty());
        assert!(get(&sent, "x-real-ip").is_empty());
    }

    #[test]
    fn trusted_hops_keep_the_entries_their_proxies_appended() {
        let mut sent = headers(&[
            ("x-forwarded-for", "6.6.6.6, 1.2.3.4"),
            ("x-forwarded-for", "192.168.1.1"),
            ("forwarded", "for=6.6.6.6, for=1.2.3.4"),
        ]);
        rewrite(&mut sent, PEER, 2);
        assert_eq!(get(&sent, "x-forwarded-for"), ["1.2.3.4, 192.168.1.1, 10.0.0.7"]);
        assert_eq!(get(&sent, "forwarded"), ["for=6.6.6.6, for=1.2.3.4, for=10.0.0.7"]);
    }

    #[test]
    fn ipv6_peers_are_quoted_in_forwarded() {
        let mut sent = headers(&[("forwarded", "for=1.2.3.4")]);
        rewrite(&mut sent, Some("2001:db8::1".parse().unwrap_or(IpAddr::from([0; 16]))), 1);
        assert_eq!(get(&sent, "forwarded"), ["for=1.2.3.4, for=\"[2001:db8::1]\""]);
        assert_eq!(get(&sent, "x-forwarded-for"), ["2001:db8::1"]);
    }
}
