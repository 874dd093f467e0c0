//! The budget settings (contract: "Budgets (spend control)"): `MODEL_PRICES`,
//! `DAILY_BUDGET_USD`, the `*_daily_budget_usd` fields of `PRODUCT_LIMITS` and
//! `CLIENT_LIMITS`, `BUDGET_RESERVATION_SECONDS` and `BUDGET_OUTAGE_SHARE`.
//!
//! Every amount is read from its decimal text into integers ([`Nanos`], [`Price`]
//! micro-USD), never through a float, and no error quotes a value.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

use super::{Env, LimitsOverride, Policy, SettingsError};
use crate::budget::outage::Share;
use crate::budget::price::{Nanos, Prices};

/// Longest `BUDGET_RESERVATION_SECONDS`: a week. Keys live that long past their day.
const MAX_RESERVATION_SECONDS: u64 = 7 * 24 * 3600;

/// Everything spend control is configured with.
#[derive(Debug, Clone)]
pub struct BudgetSettings {
    /// `MODEL_PRICES`: model -> its prices (every callable model has one when a budget is
    /// set; without budgets, a model without a price is metered but has no `cost_usd`).
    pub prices: HashMap<String, Prices>,
    /// `DAILY_BUDGET_USD`: each (product, user)'s budget, unless its product sets one.
    pub user_default: Option<Nanos>,
    /// `PRODUCT_LIMITS[p].daily_budget_usd`.
    pub user_per_product: HashMap<String, Nanos>,
    /// `PRODUCT_LIMITS[p].product_daily_budget_usd`: one budget for all users of `p`.
    pub product_total: HashMap<String, Nanos>,
    /// `CLIENT_LIMITS[c].daily_budget_usd`: one budget for all requests of client `c`.
    pub clients: HashMap<String, Nanos>,
    /// `BUDGET_RESERVATION_SECONDS`: an unsettled reservation is charged in full after it.
    pub reservation_ttl: Duration,
    /// `BUDGET_OUTAGE_SHARE`.
    pub outage_share: Share,
}

impl BudgetSettings {
    /// The (product, user) budget of `product`'s users.
    pub fn user_budget(&self, product: &str) -> Option<Nanos> {
        self.user_per_product.get(product).copied().or(self.user_default)
    }

    /// The budget shared by all users of `product`.
    pub fn product_budget(&self, product: &str) -> Option<Nanos> {
        self.product_total.get(product).copied()
    }

    /// The budget of HMAC client `client`.
    pub fn client_budget(&self, client: &str) -> Option<Nanos> {
        self.clients.get(client).copied()
    }

    /// Whether any budget is configured at all.
    pub fn any(&self) -> bool {
        self.user_default.is_some()
            || !self.user_per_product.is_empty()
            || !self.product_total.is_empty()
            || !self.clients.is_empty()
    }

    /// Whether a budget applies to a request of `product` (by `client`, for HMAC): then
    /// the requests whose cost cannot be reserved are refused.
    pub fn applies(&self, product: &str, client: Option<&str>) -> bool {
        self.user_budget(product).is_some()
            || self.product_budget(product).is_some()
            || client.is_some_and(|c| self.client_budget(c).is_some())
    }

    /// `model`'s prices, if it has any.
    pub fn prices_of(&self, model: &str) -> Option<&Prices> {
        self.prices.get(model)
    }
}

/// The budget fields found in `PRODUCT_LIMITS` and `CLIENT_LIMITS`.
#[derive(Debug, Default)]
pub(super) struct Overrides {
    user_per_product: HashMap<String, Nanos>,
    product_total: HashMap<String, Nanos>,
    clients: HashMap<String, Nanos>,
}

impl Overrides {
    /// Takes the budget fields of one entry; `what` is `product` or `client`.
    pub(super) fn add(&mut self, what: &str, id: &str, entry: &LimitsOverride) -> Result<(), String> {
        let budget = |field: &str, raw: &RawValue| {
            Nanos::parse_budget_usd(number(raw).ok_or_else(|| format!("{field} must be a JSON number"))?)
                .map_err(|e| format!("{field} {e}"))
        };
        if let Some(raw) = &entry.daily_budget_usd {
            let amount = budget("daily_budget_usd", raw)?;
            if what == "product" {
                self.user_per_product.insert(id.to_owned(), amount);
            } else {
                self.clients.insert(id.to_owned(), amount);
            }
        }
        if let Some(raw) = &entry.product_daily_budget_usd {
            if what != "product" {
                return Err("product_daily_budget_usd is a field of PRODUCT_LIMITS only".to_owned());
            }
            let amount = budget("product_daily_budget_usd", raw)?;
            self.product_total.insert(id.to_owned(), amount);
        }
        Ok(())
    }
}

/// A JSON number's text (a JSON string is not a number).
fn number(raw: &RawValue) -> Option<&str> {
    let text = raw.get().trim();
    text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        .then_some(text)
}

impl Env<'_> {
    pub(super) fn budgets(&self, overrides: Overrides) -> Result<BudgetSettings, SettingsError> {
        const PRICES: &str = "MODEL_PRICES";
        let raw: HashMap<String, Box<RawValue>> = self
            .json(
                PRICES,
                "a JSON object of model name to {\"input\", \"output\", \"cached_input\", \"context_tokens\"}",
            )?
            .unwrap_or_default();
        let mut prices = HashMap::with_capacity(raw.len());
        for (model, entry) in raw {
            let parsed = Prices::from_json(entry.get())
                .map_err(|e| SettingsError::new(PRICES, format!("model \"{model}\": {e}")))?;
            prices.insert(model, parsed);
        }
        let user_default = self.parse("DAILY_BUDGET_USD", |v| {
            Nanos::parse_budget_usd(v).map_err(|e| format!("expected an amount in USD: {e}"))
        })?;
        let reservation_seconds = self
            .parse("BUDGET_RESERVATION_SECONDS", |v| match v.parse::<u64>() {
                Ok(n) if (1..=MAX_RESERVATION_SECONDS).contains(&n) => Ok(n),
                _ => Err(format!(
                    "expected a whole number of seconds from 1 to {MAX_RESERVATION_SECONDS}"
                )),
            })?
            .unwrap_or(3600);
        let outage_share = self
            .parse("BUDGET_OUTAGE_SHARE", |v| {
                Share::parse(v).map_err(|e| format!("expected a share greater than 0 and at most 1: {e}"))
            })?
            .unwrap_or_else(Share::default_share);
        Ok(BudgetSettings {
            prices,
            user_default,
            user_per_product: overrides.user_per_product,
            product_total: overrides.product_total,
            clients: overrides.clients,
            reservation_ttl: Duration::from_secs(reservation_seconds),
            outage_share,
        })
    }
}

/// With any budget set, every model that can be called (chat or embedding, of any
/// product) must have a price, and chat models an `output` price: a model without one
/// would be admitted at no cost.
pub(super) fn check_prices(
    budgets: &BudgetSettings,
    products: &HashSet<Arc<str>>,
    policy: &Policy,
    product_policies: &HashMap<Arc<str>, Policy>,
) -> Result<(), SettingsError> {
    if !budgets.any() {
        return Ok(());
    }
    for product in products {
        let policy = product_policies.get(product).unwrap_or(policy);
        for model in &policy.allowed_models {
            match budgets.prices.get(model) {
                None => return Err(unpriced(model)),
                Some(prices) if prices.output.is_none() => {
                    return Err(SettingsError::new(
                        "MODEL_PRICES",
                        format!("chat model \"{model}\" has no \"output\" price, and a budget is set"),
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(model) = policy
            .embedding_models
            .iter()
            .find(|m| !budgets.prices.contains_key(*m))
        {
            return Err(unpriced(model));
        }
    }
    Ok(())
}

fn unpriced(model: &str) -> SettingsError {
    SettingsError::new(
        "MODEL_PRICES",
        format!("model \"{model}\" can be called but has no price, and a budget is set"),
    )
}
