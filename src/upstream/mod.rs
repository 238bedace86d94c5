//! Upstreams and routing: which provider endpoints serve which models, and how a
//! request path under `/v1` becomes a URL on one of them.
//!
//! An [`UpstreamSet`] is built once per config. [`choose`] picks one of a request's
//! candidates: by weight among the healthy ones, avoiding the one that just failed.

use std::{sync::Arc, time::Duration};

use http::{HeaderValue, uri::PathAndQuery};

use crate::{
    config::{ModelGlobs, UpstreamConfig},
    error::StartupError,
};

pub mod connect;
pub mod forwarded;
pub mod headers;
pub mod health;
pub mod http1;
pub mod path;
pub mod pool;

pub use pool::{Pool, UpstreamBody};

/// One configured provider endpoint and its connection pool.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// The `host` header its requests carry: the base URL's authority.
    pub host: HeaderValue,
    /// The base URL's path without a trailing slash, e.g. `/v1` or `/openai/deployments/x`.
    base_path: String,
    /// `Bearer <api_key>`, marked sensitive; `None` forwards the caller's key.
    pub authorization: Option<HeaderValue>,
    /// Who is billed: the configured `openai-organization` / `openai-project`, and
    /// whether a caller may choose its own next to `authorization`.
    pub billing: Billing,
    models: ModelGlobs,
    pub weight: u32,
    /// Per attempt, until the response head.
    pub timeout: Duration,
    pub pool: Arc<Pool>,
    pub health: health::Health,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, StartupError> {
        let parts = config.base_url.clone().into_parts();
        let (Some(_), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(StartupError::Other(format!(
                "upstream `{}`: base_url must be absolute",
                config.name
            )));
        };
        let host = HeaderValue::try_from(authority.as_str()).map_err(|_| {
            StartupError::Other(format!("upstream `{}`: its host is not a valid header value", config.name))
        })?;
        let base_path =
            parts.path_and_query.map(|path| path.path().trim_end_matches('/').to_owned()).unwrap_or_default();
        let authorization = match &config.api_key {
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| {
                    StartupError::Other(format!(
                        "upstream `{}`: api_key is not a valid header value",
                        config.name
                    ))
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let header = |field: &str, value: &Option<String>| {
            value.as_deref().map(HeaderValue::try_from).transpose().map_err(|_| {
                StartupError::Other(format!(
                    "upstream `{}`: {field} is not a valid header value",
                    config.name
                ))
            })
        };
        let billing = Billing {
            organization: header("organization", &config.organization)?,
            project: header("project", &config.project)?,
            forward_callers: config.forward_caller_org,
        };
        Ok(Self {
            name: config.name.clone(),
            host,
            base_path,
            authorization,
            billing,
            models: config.models.clone(),
            weight: config.weight.get(),
            timeout: config.timeout,
            pool: Pool::new(connect::Target::new(
                &config.base_url,
                config.connect_timeout,
                config.ca_file.as_deref(),
            )?),
            health: health::Health::default(),
        })
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.matches(model)
    }

    /// The upstream's request target (origin form) for a client's `/v1/...` path and
    /// query: the part after `/v1` goes under the base URL's path, the query is kept as
    /// sent.
    pub fn target_for(&self, client_path_and_query: &PathAndQuery) -> String {
        let path = client_path_and_query.path();
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let mut target = String::with_capacity(self.base_path.len() + client_path_and_query.as_str().len());
        target.push_str(&self.base_path);
        target.push_str(rest);
        if target.is_empty() {
            target.push('/');
        }
        if let Some(query) = client_path_and_query.query() {
            target.push('?');
            target.push_str(query);
        }
        target
    }
}

/// The OpenAI headers that choose which organization and project a call is billed to.
#[derive(Debug, Default)]
pub struct Billing {
    pub organization: Option<HeaderValue>,
    pub project: Option<HeaderValue>,
    /// The caller's own headers go upstream even next to the upstream's `api_key`.
    pub forward_callers: bool,
}

impl Billing {
    pub const ORGANIZATION: http::HeaderName = http::HeaderName::from_static("openai-organization");
    pub const PROJECT: http::HeaderName = http::HeaderName::from_static("openai-project");

    /// Sets the billing headers of a request to this upstream. `callers_own_key`: the
    /// caller's provider key is what goes upstream, so its choice bills only itself.
    /// Otherwise the operator's key is used, and a caller may not pick the account
    /// unless the upstream allows it.
    pub fn apply(&self, headers: &mut http::HeaderMap, callers_own_key: bool) {
        if !callers_own_key && !self.forward_callers {
            headers.remove(Self::ORGANIZATION);
            headers.remove(Self::PROJECT);
        }
        for (name, value) in [(Self::ORGANIZATION, &self.organization), (Self::PROJECT, &self.project)] {
            if let Some(value) = value {
                headers.insert(name, value.clone());
            }
        }
    }
}

/// Every configured upstream, in config order.
#[derive(Debug)]
pub struct UpstreamSet {
    upstreams: Vec<Arc<Upstream>>,
}

impl UpstreamSet {
    pub fn new(configs: &[UpstreamConfig]) -> Result<Self, StartupError> {
        let upstreams = configs
            .iter()
            .map(|config| Upstream::new(config).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if upstreams.is_empty() {
            return Err(StartupError::Other("no upstream configured".into()));
        }
        Ok(Self { upstreams })
    }

    /// The upstreams that may serve a request, in preference order: those whose
    /// `models` globs match `model` in config order, or the first upstream for requests
    /// without a model (GET /v1/models, file uploads). Empty when no upstream serves
    /// the model.
    pub fn candidates(&self, model: Option<&str>) -> Vec<Arc<Upstream>> {
        match model {
            Some(model) => self.upstreams.iter().filter(|up| up.serves(model)).cloned().collect(),
            None => self.upstreams.first().cloned().into_iter().collect(),
        }
    }
}

/// Picks the upstream for an attempt among `candidates` (in config order): "first
/// match by order, then weight". The first match and the upstreams listed after it for
/// the same `models` form the preferred pool, chosen among by `weight`; later matches
/// are fallbacks. Upstreams cooling down, and `avoid` (the one that just failed), are
/// skipped while anything else is left; the next pool in order takes over when the
/// preferred one has nothing usable; when every candidate is cooling down, the least
/// recently failed one is still tried. `unit` is a uniform random number in [0, 1).
pub fn choose<'a>(candidates: &'a [Arc<Upstream>], avoid: Option<&str>, unit: f64) -> &'a Arc<Upstream> {
    let now = tokio::time::Instant::now();
    let warm = |up: &&Arc<Upstream>| !up.health.is_cooling(now);
    let fresh = |up: &&Arc<Upstream>| warm(up) && Some(up.name.as_str()) != avoid;
    let anchor = candidates.iter().find(fresh).or_else(|| candidates.iter().find(warm));
    let Some(anchor) = anchor else {
        // All cooling: the one whose last failure is oldest is the best bet.
        return candidates.iter().min_by_key(|up| up.health.last_failure()).unwrap_or(&candidates[0]);
    };
    let fresh_anchor = fresh(&anchor);
    let pool: Vec<&Arc<Upstream>> = candidates
        .iter()
        .filter(|up| up.models.patterns == anchor.models.patterns)
        .filter(|up| if fresh_anchor { fresh(up) } else { warm(up) })
        .collect();
    let total: u64 = pool.iter().map(|up| u64::from(up.weight)).sum();
    let mut ticket = (unit.clamp(0.0, 1.0) * total as f64) as u64;
    for upstream in &pool {
        if ticket < u64::from(upstream.weight) {
            return upstream;
        }
        ticket -= u64::from(upstream.weight);
    }
    pool.last().copied().unwrap_or(anchor)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::config::{ModelGlobs, UpstreamConfig};

    fn upstream(name: &str, weight: u32) -> Arc<Upstream> {
        serving(name, weight, "*")
    }

    fn serving(name: &str, weight: u32, models: &str) -> Arc<Upstream> {
        let models = ModelGlobs { patterns: vec![models.into()], set: globset::GlobSet::empty() };
        let config = UpstreamConfig {
            name: name.into(),
            base_url: http::Uri::from_static("http://127.0.0.1:9/v1"),
            api_key: None,
            models,
            weight: NonZeroU32::new(weight).unwrap_or(NonZeroU32::MIN),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            ca_file: None,
            organization: None,
            project: None,
            forward_caller_org: false,
        };
        Arc::new(Upstream::new(&config).unwrap_or_else(|error| panic!("{error}")))
    }

    #[tokio::test(start_paused = true)]
    async fn picks_by_weight_avoids_the_failed_and_skips_the_cooling() {
        let pool = [upstream("a", 1), upstream("b", 3)];
        let picks: Vec<&str> =
            [0.0, 0.24, 0.26, 0.99].iter().map(|u| choose(&pool, None, *u).name.as_str()).collect();
        assert_eq!(picks, ["a", "a", "b", "b"]);
        assert_eq!(choose(&pool, Some("b"), 0.99).name, "a", "a retry prefers another upstream");

        for _ in 0..health::FAILURES_TO_COOL {
            pool[1].health.failure(None);
        }
        assert_eq!(choose(&pool, None, 0.99).name, "a", "a cooling upstream is skipped");

        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..health::FAILURES_TO_COOL {
            pool[0].health.failure(None);
        }
        assert_eq!(choose(&pool, None, 0.0).name, "b", "all cooling: the least recently failed");

        tokio::time::advance(health::COOLDOWN).await;
        assert_eq!(choose(&pool, None, 0.0).name, "a", "cool-downs end by themselves");
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_match_is_a_fallback_not_a_share() {
        let pool = [serving("primary", 1, "gpt-*"), serving("catch-all", 100, "*")];
        for unit in [0.0, 0.5, 0.99] {
            assert_eq!(choose(&pool, None, unit).name, "primary");
        }
        assert_eq!(choose(&pool, Some("primary"), 0.0).name, "catch-all");
    }
}
