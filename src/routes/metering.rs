//! The budget step of the metered routes (chat, responses, embeddings): the worst case
//! of a validated request, its admission in every budgeted scope, and what the upstream's
//! answer then costs: 0 for a status that is not 2xx, the reservation for a request that
//! got no status after its body was sent, the usage read from a 2xx body as it passes.

use std::sync::Arc;

use axum::body::Body;
use http::HeaderMap;

use crate::app::App;
use crate::auth::Identity;
use crate::budget::Nanos;
use crate::budget::admission::{Admission, BudgetHeaders, Prepared};
use crate::budget::price::Prices;
use crate::budget::redis::{Folded, FoldedAnswer};
use crate::error::ApiError;
use crate::limit::Grant;
use crate::meter::{Meter, MeterLog, MeteredBody, Reader, Reserved};
use crate::request::Outcome;
use crate::upstream::{Cause, Forwarded, UpstreamFailure};
use crate::validate::{Metering, ValidationError};

/// What the reservation is computed from (contract: "Reservation").
pub struct Worst<'a> {
    /// The model, decoded.
    pub model: &'a str,
    /// The forwarded body's length: a text token is at least one byte.
    pub body_bytes: usize,
    /// The settled input and output tokens of the `previous_response_id`, if any.
    pub previous_tokens: u64,
    /// The output limit as forwarded (0 for embeddings).
    pub output_limit: u64,
    /// Chat `n` (1 otherwise).
    pub n: u64,
    /// An image, file or audio part, or a hosted tool: only the context window bounds it.
    pub needs_context_window: bool,
    /// The parameter a refusal for an unknown context window names.
    pub input_param: &'static str,
}

impl<'a> Worst<'a> {
    /// From what validation found; `previous_tokens` from the ownership record.
    pub fn of(metering: &'a Metering, body_bytes: usize, previous_tokens: u64, input_param: &'static str) -> Self {
        Self {
            model: &metering.model,
            body_bytes,
            previous_tokens,
            output_limit: metering.output_limit,
            n: metering.n,
            needs_context_window: metering.needs_context_window,
            input_param,
        }
    }
}

/// Whether a budget applies to `identity`'s requests (then validation refuses what
/// cannot be reserved).
pub fn budgeted(app: &App, identity: &Identity) -> bool {
    app.budgets.applies(identity)
}

/// The reservation in tokens, or 400 `unsupported_parameter` for a body whose input only
/// a context window bounds, while a budget applies to a model that has none.
pub fn reserve_tokens(worst: &Worst<'_>, prices: Option<&Prices>, budgeted: bool) -> Result<Reserved, ApiError> {
    let context = prices.and_then(|p| p.context_tokens);
    let body = u64::try_from(worst.body_bytes).unwrap_or(u64::MAX);
    let mut input = body.saturating_add(worst.previous_tokens);
    if worst.needs_context_window {
        match context {
            Some(window) => input = window,
            None if budgeted => return Err(ValidationError::Unsupported(worst.input_param).into()),
            None => {}
        }
    }
    if let Some(window) = context {
        input = input.min(window);
    }
    let output = if worst.n > 1 {
        worst.output_limit.saturating_mul(worst.n)
    } else {
        worst.output_limit
    };
    Ok(Reserved {
        input_tokens: input,
        output_tokens: output,
    })
}

/// A validated request's model, prices and worst case, ready for the budget decision.
pub struct Plan {
    model: Box<str>,
    prices: Option<Prices>,
    reserved: Reserved,
    /// The reservation's price.
    amount: Nanos,
    /// `None` when no budget applies.
    budget: Option<Prepared>,
}

impl Plan {
    /// The user budget's reservation for the limiter's Redis call to make, if any.
    pub fn folded(&self) -> Option<&Folded> {
        self.budget.as_ref().and_then(Prepared::folded)
    }
}

/// The worst case of a validated request, priced (400 `unsupported_parameter` when it
/// cannot be reserved while a budget applies): a validation step, so it comes before the
/// limits.
pub fn plan(app: &App, identity: &Identity, worst: &Worst<'_>, budgeted: bool) -> Result<Plan, ApiError> {
    let prices = app.budgets.settings().prices_of(worst.model).copied();
    let reserved = reserve_tokens(worst, prices.as_ref(), budgeted)?;
    let amount = reserved.cost(prices.as_ref());
    let budget = if budgeted {
        app.budgets.prepare(identity, amount)
    } else {
        None
    };
    Ok(Plan {
        model: worst.model.into(),
        prices,
        reserved,
        amount,
        budget,
    })
}

/// The limits, then the budget decision: the limits' grant and the metered request, or
/// the answer to a refusal (429 `budget_exceeded` with its log fields and the limits'
/// headers). When the user budget is the only one and Redis is configured, its
/// reservation rides in the limiter's Redis call.
pub async fn limit_and_admit(app: &App, identity: &Identity, plan: Plan) -> Result<(Grant, Metered), Outcome> {
    let grant = match app.limiter.admit_folding(identity, plan.folded()).await {
        Ok(grant) => grant,
        Err(refused) => return Err(Outcome::from(ApiError::from(refused))),
    };
    match Metered::admit(app, identity, plan, grant.folded).await {
        Ok(metered) => Ok((grant, metered)),
        Err((error, log)) => {
            let mut outcome = Outcome::from(error);
            outcome.log.meter = Some(log);
            grant.headers.write(outcome.response.headers_mut());
            Err(outcome)
        }
    }
}

/// A metered request after its budget decision.
pub struct Metered {
    pub log: MeterLog,
    headers: Option<BudgetHeaders>,
    product: Arc<str>,
    prices: Option<Prices>,
    reserved: Reserved,
    admission: Option<Admission>,
    settled: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Metered {
    /// The budget decision: admitted (or no budget), or the 429 `budget_exceeded` answer
    /// with its log fields.
    async fn admit(
        app: &App,
        identity: &Identity,
        plan: Plan,
        folded: Option<FoldedAnswer>,
    ) -> Result<Self, (ApiError, MeterLog)> {
        let Plan {
            model,
            prices,
            reserved,
            amount,
            budget,
        } = plan;
        let mut log = MeterLog::new(&model);
        let admitted = match budget {
            Some(prepared) => app.budgets.admit(identity, prepared, folded).await.map(Some),
            None => Ok(None),
        };
        let admission = match admitted {
            Ok(admission) => admission,
            Err(refusal) => {
                log.reservation = Some(amount);
                log.budget_scope = Some(refusal.scope);
                log.budget_store = Some(refusal.store.as_str());
                return Err((ApiError::BudgetExceeded(refusal), log));
            }
        };
        if let Some(admission) = &admission {
            log.reservation = Some(admission.amount);
            log.budget_store = Some(admission.store.as_str());
        }
        Ok(Self {
            headers: admission.as_ref().and_then(|a| a.headers),
            log,
            product: Arc::clone(&identity.product),
            prices,
            reserved,
            admission,
            settled: None,
        })
    }

    /// The `x-budget-*` headers of the caller's (product, user) budget, if it has one.
    fn write_headers(&self, headers: &mut HeaderMap) {
        if let Some(budget) = &self.headers {
            budget.write(headers);
        }
    }

    /// The reservation's input and output tokens.
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved.input_tokens.saturating_add(self.reserved.output_tokens)
    }

    /// Called with the response's settled input and output tokens when its body ends
    /// (the ownership record of a created response keeps them).
    pub fn on_settled(&mut self, hook: Box<dyn FnOnce(u64) + Send>) {
        self.settled = Some(hook);
    }

    /// The client's answer to the upstream's: a 2xx body metered as it passes and
    /// settled when it ends (usage read by `reader`); any other status costs nothing;
    /// no status at all costs the reservation once the body may have gone out.
    pub async fn outcome(
        mut self,
        app: &App,
        forwarded: Result<Forwarded, UpstreamFailure>,
        reader: Reader,
    ) -> Outcome {
        let mut outcome = match forwarded {
            Err(failure) => {
                if let Some(admission) = self.admission.take() {
                    let sent = failure.cause.is_some_and(Cause::after_sending);
                    let cost = if sent { admission.amount } else { Nanos::ZERO };
                    app.budgets.settle(admission, cost).await;
                }
                Outcome::from(failure)
            }
            Ok(forwarded) if (200..300).contains(&forwarded.status) => {
                let mut outcome = Outcome::from(forwarded);
                let body = std::mem::take(outcome.response.body_mut());
                let meter = Meter {
                    product: Arc::clone(&self.product),
                    log: Arc::clone(&self.log.figures),
                    model: self.log.model.clone(),
                    prices: self.prices,
                    reserved: self.reserved,
                    budget: self.admission.take().map(|a| (app.budgets.clone(), a)),
                    settled: self.settled.take(),
                };
                *outcome.response.body_mut() = Body::new(MeteredBody::new(body, reader, meter));
                outcome
            }
            Ok(forwarded) => {
                if let Some(admission) = self.admission.take() {
                    app.budgets.settle(admission, Nanos::ZERO).await;
                }
                Outcome::from(forwarded)
            }
        };
        self.write_headers(outcome.response.headers_mut());
        outcome.log.meter = Some(self.log);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::price::Price;

    fn worst(body_bytes: usize, previous_tokens: u64, n: u64, needs_context_window: bool) -> Worst<'static> {
        Worst {
            model: "m",
            body_bytes,
            previous_tokens,
            output_limit: 100,
            n,
            needs_context_window,
            input_param: "messages",
        }
    }

    fn prices(context_tokens: Option<u64>) -> Prices {
        Prices {
            input: Price::from_micros_per_million(1_000_000),
            output: Some(Price::from_micros_per_million(2_000_000)),
            cached_input: Price::from_micros_per_million(1_000_000),
            context_tokens,
        }
    }

    #[test]
    fn the_reservation_is_the_worst_case_the_contract_names() {
        let reserve =
            |w: &Worst<'_>, p: Option<&Prices>, budgeted| reserve_tokens(w, p, budgeted).map_err(|e| e.code());
        // Bytes as input tokens, plus the previous response's settled tokens; output x n.
        assert_eq!(
            reserve(&worst(500, 40, 3, false), Some(&prices(None)), true),
            Ok(Reserved {
                input_tokens: 540,
                output_tokens: 300
            })
        );
        // The context window bounds any input, and is the input of an image or a hosted tool.
        assert_eq!(
            reserve(&worst(5_000, 0, 1, false), Some(&prices(Some(1_000))), true).map(|r| r.input_tokens),
            Ok(1_000)
        );
        assert_eq!(
            reserve(&worst(10, 0, 1, true), Some(&prices(Some(1_000))), true).map(|r| r.input_tokens),
            Ok(1_000)
        );
        // Without a context window such a body cannot be reserved while a budget applies.
        assert_eq!(
            reserve(&worst(10, 0, 1, true), Some(&prices(None)), true),
            Err("unsupported_parameter")
        );
        assert!(reserve(&worst(10, 0, 1, true), None, false).is_ok());
        // 1,000 nanos per input token, 2,000 per output token.
        let reserved = reserve(&worst(500, 0, 1, false), Some(&prices(None)), true).unwrap();
        assert_eq!(reserved.cost(Some(&prices(None))), Nanos(500 * 1_000 + 100 * 2_000));
    }
}
