//! The response body of an admitted request: relays it frame by frame while watching
//! for the real token usage, then settles the caller's token estimate and gives back
//! its concurrency slot.
//!
//! Settling happens exactly once: when the body ends, when it fails, or when it is
//! dropped unfinished (the client went away). Usage comes from the response's `usage`
//! (a JSON body's, or a stream's final usage chunk); a stream without one is counted
//! from its text. A usage chunk the gateway asked for on the client's behalf
//! (`stream_options.include_usage`) is stripped here before the client sees it.
//! Responses that are not 2xx, and cache hits, cost no tokens. Every model call is
//! watched, limited or not, so that its usage reaches `spillway_tokens_total` and the
//! access-log line ([`UsageSeen`]).

use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::header;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::{GatewayResponse, ResponseBody, cache::CacheStatus};
use crate::{
    error::BoxError,
    limit::{BucketKey, Limiter, Permit, Quota},
    metrics,
    openai::{self, Usage, sse::StreamWatch, tokens},
    secret::KeyId,
};

/// JSON bodies larger than this are not kept for their `usage` (the estimate stands).
const MAX_USAGE_BODY: usize = 8 << 20;

/// An admitted request's claim on its caller's buckets, to be settled once.
pub struct Settlement {
    pub limiter: Arc<dyn Limiter>,
    pub key: BucketKey,
    pub quota: Quota,
    pub estimate: tokens::TokenEstimate,
    pub permit: Permit,
    /// The request's span, for the settle's log lines.
    pub span: tracing::Span,
}

impl Settlement {
    /// Gives the whole estimate back (nothing reached a model) and frees the slot.
    pub fn refund(self) {
        self.settle(0);
    }

    /// Charges `actual` tokens instead of the estimate, and frees the slot.
    fn settle(self, actual: u64) {
        // Counts come from the upstream: saturate rather than wrap on absurd ones.
        let signed = |count: u64| i64::try_from(count).unwrap_or(i64::MAX);
        let delta = signed(actual).saturating_sub(signed(self.estimate.total()));
        if !self.permit.is_held() && (delta == 0 || self.quota.tokens_per_minute.is_none()) {
            return;
        }
        let (limiter, key, quota, permit) = (self.limiter, self.key, self.quota, self.permit);
        // The local limiter settles at once, so the next request of this caller
        // already sees it; a remote one finishes in the background.
        super::finish_soon(self.span, async move {
            if let Err(error) = limiter.finish(&key, &quota, delta, permit).await {
                tracing::warn!(%error, "could not settle token usage");
            }
        });
    }
}

/// The usage a response reported, set when its body ends: a response extension the
/// access log reads.
#[derive(Debug, Clone, Default)]
pub struct UsageSeen(Arc<OnceLock<Usage>>);

impl UsageSeen {
    pub fn get(&self) -> Option<&Usage> {
        self.0.get()
    }
}

/// What the body is, for finding its usage.
enum Watch {
    /// `text/event-stream`: events watched (and the usage chunk stripped) as they pass.
    Stream(Box<StreamWatch>),
    /// JSON: frames kept (reference-counted, not copied) to read `usage` at the end.
    Json { frames: Vec<Bytes>, len: usize },
    /// Anything else: no usage to find, the estimate stands.
    Opaque,
    /// An error status: no tokens were spent.
    Free,
}

/// The settling, usage-watching response body.
pub struct Metered {
    body: ResponseBody,
    watch: Watch,
    settlement: Option<Settlement>,
    /// Whose usage, for `spillway_tokens_total`.
    caller: KeyId,
    model: String,
    seen: UsageSeen,
    /// A held-back tail to send after the inner body ended.
    tail: Option<Bytes>,
    /// A cache hit: no tokens were spent upstream.
    free: bool,
    /// The inner body has ended.
    ended: bool,
    /// Usage was looked for (and the settlement made) already.
    finished: bool,
}

impl Metered {
    /// Wraps `response`'s body, the answer to `caller`'s call of `model`.
    /// `strip_usage`: the client did not ask for the stream's usage chunk, the gateway did.
    pub fn wrap(
        response: GatewayResponse,
        caller: KeyId,
        model: String,
        settlement: Option<Settlement>,
        strip_usage: bool,
    ) -> GatewayResponse {
        let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
        let essence = content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim();
        let hit = response.extensions().get::<CacheStatus>() == Some(&CacheStatus::Hit);
        let watch = if !response.status().is_success() {
            Watch::Free
        } else if essence.eq_ignore_ascii_case("text/event-stream") {
            Watch::Stream(Box::new(StreamWatch::new(strip_usage, &model)))
        } else if essence.eq_ignore_ascii_case("application/json") {
            Watch::Json { frames: Vec::new(), len: 0 }
        } else {
            Watch::Opaque
        };
        let mut response = response;
        if strip_usage && matches!(watch, Watch::Stream(_)) {
            // Stripping shortens the body: its upstream length no longer holds.
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        let seen = UsageSeen::default();
        response.extensions_mut().insert(seen.clone());
        response.map(|body| {
            let (tail, free, ended, finished) = (None, hit, false, false);
            Self { body, watch, settlement, caller, model, seen, tail, free, ended, finished }.boxed_unsync()
        })
    }

    /// Reads the usage (once): records it, and settles with the best usage known now.
    fn finish(&mut self, complete: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let usage = match &self.watch {
            _ if self.free => None,
            Watch::Stream(watch) => watch.usage(),
            Watch::Json { frames, .. } if complete => openai::usage_from_json(&frames.concat()),
            _ => None,
        };
        if let Some(usage) = usage {
            metrics::tokens(&self.caller, &self.model, usage.prompt_tokens, usage.completion_tokens);
            let _ = self.seen.0.set(usage);
        }
        let Some(settlement) = self.settlement.take() else { return };
        let actual = match &mut self.watch {
            _ if self.free => 0,
            // No token bucket to settle: nothing to count.
            _ if settlement.quota.tokens_per_minute.is_none() => settlement.estimate.total(),
            _ if usage.is_some() => usage.map_or(0, |usage| usage.total_tokens),
            Watch::Stream(watch) => settlement.estimate.prompt + watch.completion_tokens(),
            Watch::Free => 0,
            _ => settlement.estimate.total(),
        };
        settlement.settle(actual);
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(tail) = this.tail.take() {
                return Poll::Ready(Some(Ok(Frame::data(tail))));
            }
            let frame = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.ended = true;
                    if let Watch::Stream(watch) = &mut this.watch
                        && let Some(tail) = watch.finish()
                    {
                        this.tail = Some(tail);
                        this.finish(true);
                        continue;
                    }
                    this.finish(true);
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(error))) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let frame = match frame.into_data() {
                Ok(data) => match &mut this.watch {
                    Watch::Stream(watch) => {
                        let relayed = watch.relay(data);
                        if relayed.is_empty() {
                            continue;
                        }
                        Frame::data(relayed)
                    }
                    Watch::Json { frames, len } => {
                        *len += data.len();
                        if *len <= MAX_USAGE_BODY {
                            frames.push(data.clone());
                        }
                        Frame::data(data)
                    }
                    Watch::Opaque | Watch::Free => Frame::data(data),
                },
                Err(trailers) => trailers,
            };
            if !matches!(this.watch, Watch::Stream(_)) && this.body.is_end_stream() {
                // The client's side may stop polling at this frame (`is_end_stream`):
                // settle now, before the access log reads the usage.
                this.finish(true);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.watch {
            // A held-back last event may still be due after the inner body ends.
            Watch::Stream(_) => self.ended && self.tail.is_none(),
            _ => self.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.watch {
            // Stripping may shorten a stream.
            Watch::Stream(_) => SizeHint::default(),
            _ => self.body.size_hint(),
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let complete = self.body.is_end_stream();
        self.finish(complete);
    }
}
