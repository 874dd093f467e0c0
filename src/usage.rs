//! Reading the upstream's token usage from what passes to the client, without holding a
//! body or an event whole: [`json`] scans a JSON body chunk by chunk, [`chat_sse`] splits a
//! chat stream into events (and can take out the usage-only chunk), [`responses_sse`]
//! watches a Responses stream for its final event.
//!
//! Each reader keeps a bounded state whatever the size of what passes; none of them
//! copies the bytes it forwards (chat events are handed back as slices of the input).
//! They never decide what a request costs: that is [`crate::budget`]'s job.

pub mod chat_sse;
pub mod json;
pub mod responses_sse;
mod sse;

/// Token usage as the upstream reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Chat and embeddings `prompt_tokens`, responses `input_tokens`: cached ones included.
    pub input_tokens: u64,
    /// `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// Chat `completion_tokens`, responses `output_tokens`, as reported.
    pub reported_output_tokens: Option<u64>,
    /// `total_tokens`, as reported.
    pub total_tokens: Option<u64>,
}

impl Usage {
    /// The output tokens that are billed: the reported output, or `total_tokens` minus the
    /// input when that is larger (some providers leave reasoning tokens out of the output
    /// count). Reasoning tokens are never added again.
    pub fn output_tokens(&self) -> u64 {
        let reported = self.reported_output_tokens.unwrap_or(0);
        let from_total = self.total_tokens.map_or(0, |t| t.saturating_sub(self.input_tokens));
        reported.max(from_total)
    }
}
