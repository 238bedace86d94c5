//! A response body that lets a stage watch frames go by without changing them, and
//! learn once how the body ended. The access log (`observe`) and the cache's capture
//! (`cache`) are taps; `metered` rewrites frames and is its own body.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::ResponseBody;
use crate::error::BoxError;

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every frame was sent.
    Complete,
    /// The body failed (upstream reset, deadline).
    Failed,
    /// Dropped unfinished: the client went away.
    Abandoned,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "completed",
            Self::Failed => "body_error",
            Self::Abandoned => "client_gone",
        }
    }
}

/// What a stage does as the body passes.
pub trait Tap: Send + 'static {
    /// A data frame on its way to the client.
    fn data(&mut self, _data: &Bytes) {}
    /// The body ended; called exactly once.
    fn end(self, how: End);
}

/// `body` with `tap` watching it.
pub struct Tapped<T: Tap> {
    body: ResponseBody,
    tap: Option<T>,
}

impl<T: Tap> Tapped<T> {
    pub fn new(body: ResponseBody, tap: T) -> Self {
        Self { body, tap: Some(tap) }
    }

    fn end(&mut self, how: End) {
        if let Some(tap) = self.tap.take() {
            tap.end(how);
        }
    }
}

// The tap is only ever reached through `&mut`, never pinned.
impl<T: Tap> Unpin for Tapped<T> {}

impl<T: Tap> Body for Tapped<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(tap)) = (frame.data_ref(), this.tap.as_mut()) {
                    tap.data(data);
                }
                // hyper stops polling a body whose length it knows once it has it all.
                if this.body.is_end_stream() {
                    this.end(End::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(End::Failed),
            Poll::Ready(None) => this.end(End::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<T: Tap> Drop for Tapped<T> {
    fn drop(&mut self) {
        // hyper may never poll a body that says it is empty.
        let how = if self.body.is_end_stream() { End::Complete } else { End::Abandoned };
        self.end(how);
    }
}
