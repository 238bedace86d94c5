//! Header hygiene between the client and the upstream: hop-by-hop headers
//! (RFC 9110 §7.6.1) never cross the gateway, in either direction, and no header that
//! would make the upstream read the request as another method goes upstream.
//!
//! Credentials are not handled here; `pipeline::forward` decides what `Authorization`
//! the upstream gets.

use http::{HeaderMap, HeaderName, header};

/// Headers that describe one connection rather than the message, plus the ones a
/// proxy must not forward (`proxy-*`). `host` is rewritten by the client to the
/// upstream's authority, so the caller's is dropped too.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers that some servers and frameworks obey to treat a request as another
/// method: a `GET` the gateway did not read as a model call must not become one.
const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Removes the method-override headers: the method the gateway decided on is the one
/// the upstream acts on.
pub fn strip_method_overrides(headers: &mut HeaderMap) {
    for name in &METHOD_OVERRIDES {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
///
/// With `keep_upgrade`, a protocol upgrade (`Connection: upgrade` + `Upgrade`) is kept
/// so that it can be relayed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let upgrade = keep_upgrade.then(|| headers.remove(header::UPGRADE)).flatten();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    }
}

/// Whether a request asks to switch protocols (WebSocket and the like).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn drops_fixed_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-trace-hop"),
            ("keep-alive", "timeout=5"),
            ("x-trace-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic abc"),
            ("content-type", "application/json"),
            ("openai-organization", "org-1"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let left: Vec<_> = map.keys().map(|name| name.as_str()).collect();
        assert_eq!(left, ["content-type", "openai-organization"]);
    }

    #[test]
    fn keeps_an_upgrade_when_asked() {
        let mut map = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&map));
        strip_hop_by_hop(&mut map, true);
        assert_eq!(map["upgrade"], "websocket");
        assert_eq!(map["connection"], "upgrade");

        let mut plain = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut plain, false);
        assert!(plain.is_empty());
    }
}
