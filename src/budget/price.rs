//! Prices and amounts of money as integers: model prices read from their decimal text,
//! budgets in USD, and the cost of a request from its [`Usage`].
//!
//! Units: a price is held in micro-USD per 1M tokens (the contract allows at most 6
//! decimals, so every valid price is an exact integer of this unit); an amount of money
//! is [`Nanos`], 1e-9 USD. Nothing here ever touches a float: a price such as `0.15` is
//! read from its digits, never through `f64` (which cannot hold 0.15 exactly).

use std::fmt;

use crate::usage::Usage;

/// The most a price may be, in USD per 1M tokens: far above any real model, low enough
/// that a cost never leaves [`Nanos`]' exact range for any token count a request has.
const MAX_PRICE_USD: u64 = 1_000_000;
/// The most a budget may be, in USD: 1e18 nanos, below `i64::MAX` (Redis's integers).
const MAX_BUDGET_USD: u64 = 1_000_000_000;
/// A price or budget has at most this many decimals (contract: "at most 6 decimals").
const MAX_DECIMALS: u32 = 6;

/// Why a price or an amount was refused. The text never holds the value itself (settings
/// errors must not echo values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("expected a JSON number")]
    NotANumber,
    #[error("must not be negative")]
    Negative,
    #[error("has more than 6 decimals")]
    TooManyDecimals,
    #[error("is too large")]
    TooLarge,
    #[error("must be greater than 0")]
    NotPositive,
}

/// An amount of money in 1e-9 USD. Sums of costs are exact in this unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(pub u64);

const NANOS_PER_MICRO: u64 = 1_000;

impl Nanos {
    pub const ZERO: Self = Self(0);
    /// What a cost saturates at (`i64::MAX`): Redis's `INCRBY` holds any amount up to it.
    pub const MAX: Self = Self(i64::MAX.unsigned_abs());

    #[must_use]
    pub fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0).min(Self::MAX.0))
    }

    #[must_use]
    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    /// Parses an amount in USD from its decimal text (`DAILY_BUDGET_USD`, the
    /// `*_daily_budget_usd` fields): the same digits rule as prices, and it must be > 0.
    pub fn parse_budget_usd(text: &str) -> Result<Self, PriceError> {
        let micros = parse_micros(text.trim(), MAX_BUDGET_USD)?;
        if micros == 0 {
            return Err(PriceError::NotPositive);
        }
        Ok(Self(micros * NANOS_PER_MICRO))
    }

    /// Decimal USD with at most 6 decimals, rounded down (toward zero): the form of
    /// `x-budget-remaining-usd`, which must never promise more than is left.
    pub fn usd_6_down(self) -> String {
        Usd::new(self.0 / NANOS_PER_MICRO, 6).to_string()
    }

    /// Decimal USD with at most 6 decimals, rounded up: for `x-budget-limit-usd` this is
    /// exact, since a budget has at most 6 decimals.
    pub fn usd_6_up(self) -> String {
        Usd::new(self.0.div_ceil(NANOS_PER_MICRO), 6).to_string()
    }
}

/// Exact decimal USD with up to 9 decimals and no trailing zeros (`0.000123456`, `2`):
/// the log line's `cost_usd` and `reservation_usd`.
impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Usd::new(self.0, 9).fmt(f)
    }
}

/// `units` of 10^-`decimals` USD as decimal text without trailing zeros, written
/// straight into the log line or header (no intermediate strings).
struct Usd {
    whole: u64,
    /// The fraction without its trailing zeros, and how many digits it then has.
    frac: u64,
    digits: usize,
}

impl Usd {
    fn new(units: u64, decimals: u32) -> Self {
        let scale = 10u64.pow(decimals);
        let (whole, mut frac, mut digits) = (units / scale, units % scale, decimals as usize);
        while frac != 0 && frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        Self { whole, frac, digits }
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.frac == 0 {
            return write!(f, "{}", self.whole);
        }
        write!(f, "{}.{:0width$}", self.whole, self.frac, width = self.digits)
    }
}

/// A price in micro-USD per 1M tokens (1e-12 USD per token).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Price(u64);

impl Price {
    pub const ZERO: Self = Self(0);

    /// Parses a price in USD per 1M tokens from its JSON number text (`2.5`, `0.075`,
    /// `1e-1`). At most 6 decimals; 0 is allowed (a model the operator does not pay for).
    pub fn parse(text: &str) -> Result<Self, PriceError> {
        parse_micros(text.trim(), MAX_PRICE_USD).map(Self)
    }

    /// The price in micro-USD per 1M tokens.
    pub fn micros_per_million(self) -> u64 {
        self.0
    }

    /// A price from micro-USD per 1M tokens (tests, and prices built in code).
    pub fn from_micros_per_million(micros: u64) -> Self {
        Self(micros.min(MAX_PRICE_USD * 1_000_000))
    }
}

/// One model's prices (`MODEL_PRICES[model]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: Price,
    /// `None` for a model priced for input only (embeddings); such a model's output
    /// tokens cost nothing, so settings require it for every chat model.
    pub output: Option<Price>,
    /// Defaults to `input`.
    pub cached_input: Price,
    /// The model's context window, in tokens: the reservation's input bound.
    pub context_tokens: Option<u64>,
}

impl Prices {
    /// Reads one `MODEL_PRICES` entry: an object with `input` (required), `output`,
    /// `cached_input` and `context_tokens` (a positive integer); any other member is an
    /// error. Prices are read from their JSON number text, never as floats.
    pub fn from_json(json: &str) -> Result<Self, PricesError> {
        let fields: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
            serde_json::from_str(json).map_err(|_| PricesError::NotAnObject)?;
        let mut input = None;
        let mut output = None;
        let mut cached_input = None;
        let mut context_tokens = None;
        for (name, raw) in fields {
            let text = raw.get();
            let field = |e| PricesError::Field(field_name(&name), e);
            match name.as_str() {
                "input" => input = Some(Price::parse(number_text(text).map_err(field)?).map_err(field)?),
                "output" => output = Some(Price::parse(number_text(text).map_err(field)?).map_err(field)?),
                "cached_input" => {
                    cached_input = Some(Price::parse(number_text(text).map_err(field)?).map_err(field)?);
                }
                "context_tokens" => {
                    let tokens = number_text(text)
                        .map_err(field)?
                        .parse::<u64>()
                        .ok()
                        .filter(|t| *t > 0)
                        .ok_or(PricesError::ContextTokens)?;
                    context_tokens = Some(tokens);
                }
                _ => return Err(PricesError::UnknownField),
            }
        }
        let input = input.ok_or(PricesError::MissingInput)?;
        Ok(Self {
            input,
            output,
            cached_input: cached_input.unwrap_or(input),
            context_tokens,
        })
    }
}

/// Why a `MODEL_PRICES` entry was refused (never echoing a value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricesError {
    #[error("expected an object of prices")]
    NotAnObject,
    #[error("`input` is required")]
    MissingInput,
    #[error("unknown field (expected input, output, cached_input, context_tokens)")]
    UnknownField,
    #[error("`context_tokens` must be a positive integer")]
    ContextTokens,
    #[error("`{0}` {1}")]
    Field(&'static str, PriceError),
}

fn field_name(name: &str) -> &'static str {
    match name {
        "input" => "input",
        "output" => "output",
        "cached_input" => "cached_input",
        _ => "context_tokens",
    }
}

/// The text of a JSON number, or an error for any other JSON value (`"2.5"` is a string).
fn number_text(raw: &str) -> Result<&str, PriceError> {
    let text = raw.trim();
    match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => Ok(text),
        _ => Err(PriceError::NotANumber),
    }
}

/// Parses a JSON number's text (`-?int(.frac)?([eE][+-]?exp)?`) into micro-units, exactly:
/// the value must be >= 0, have at most 6 decimals once the exponent is applied, and be at
/// most `max_whole`.
fn parse_micros(text: &str, max_whole: u64) -> Result<u64, PriceError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let negative = bytes.first() == Some(&b'-');
    if negative {
        i += 1;
    }
    let int_start = i;
    while bytes.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_digits = &bytes[int_start..i];
    // JSON: at least one integer digit, and no leading zero before more digits.
    if int_digits.is_empty() || (int_digits.len() > 1 && int_digits[0] == b'0') {
        return Err(PriceError::NotANumber);
    }
    let mut frac_digits: &[u8] = &[];
    if bytes.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac_digits = &bytes[start..i];
        if frac_digits.is_empty() {
            return Err(PriceError::NotANumber);
        }
    }
    let mut exponent: i64 = 0;
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_negative = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            // A huge exponent is refused below either way; cap it so it cannot overflow.
            exponent = (exponent * 10 + i64::from(bytes[i] - b'0')).min(1_000_000);
            i += 1;
        }
        if i == start {
            return Err(PriceError::NotANumber);
        }
        if exp_negative {
            exponent = -exponent;
        }
    }
    if i != bytes.len() {
        return Err(PriceError::NotANumber);
    }
    // The value is digits × 10^(exponent - frac_digits.len()); trailing zeros of the digit
    // string do not count as decimals (`1.50` has one, `2.5e-6` has seven).
    let mut digits: Vec<u8> = int_digits.iter().chain(frac_digits).copied().collect();
    let mut scale = exponent - i64::try_from(frac_digits.len()).map_err(|_| PriceError::TooLarge)?;
    while digits.len() > 1 && digits.last() == Some(&b'0') {
        digits.pop();
        scale += 1;
    }
    let all_zero = digits.iter().all(|d| *d == b'0');
    if all_zero {
        return if negative { Err(PriceError::Negative) } else { Ok(0) };
    }
    if negative {
        return Err(PriceError::Negative);
    }
    // In micro-units: digits × 10^(scale + 6), which must be a whole number.
    let micro_scale = scale + i64::from(MAX_DECIMALS);
    if micro_scale < 0 {
        return Err(PriceError::TooManyDecimals);
    }
    let first_nonzero = digits.iter().position(|d| *d != b'0').unwrap_or(0);
    let significant = &digits[first_nonzero..];
    // More than 19 digits of micro-units cannot be <= max_whole × 10^6 (<= 1e15).
    if i64::try_from(significant.len()).map_err(|_| PriceError::TooLarge)? + micro_scale > 19 {
        return Err(PriceError::TooLarge);
    }
    let mut micros: u64 = 0;
    for d in significant {
        micros = micros * 10 + u64::from(d - b'0');
    }
    for _ in 0..micro_scale {
        micros *= 10;
    }
    if micros > max_whole * 1_000_000 {
        return Err(PriceError::TooLarge);
    }
    Ok(micros)
}

/// The cost of a request with `usage` at `prices`, exactly: (input - cached) × input +
/// cached × `cached_input` + output × output, prices per 1M tokens, rounded up to a whole
/// 1e-9 USD. Output tokens are [`Usage::output_tokens`] (the larger of the reported
/// output and total - input). Saturates at [`Nanos::MAX`].
pub fn cost(usage: &Usage, prices: &Prices) -> Nanos {
    let cached = usage.cached_tokens.min(usage.input_tokens);
    let uncached = usage.input_tokens - cached;
    let output_price = prices.output.unwrap_or(Price::ZERO);
    // Tokens × micro-USD per 1M tokens = 1e-12 USD; u64 × u64 fits u128, three such sums too.
    let pico = u128::from(uncached) * u128::from(prices.input.0)
        + u128::from(cached) * u128::from(prices.cached_input.0)
        + u128::from(usage.output_tokens()) * u128::from(output_price.0);
    let nanos = pico.div_ceil(1_000);
    Nanos(u64::try_from(nanos).unwrap_or(u64::MAX).min(Nanos::MAX.0))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn usage(input: u64, cached: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            cached_tokens: cached,
            reported_output_tokens: Some(output),
            total_tokens: None,
        }
    }

    fn prices(input: &str, output: &str, cached: &str) -> Prices {
        Prices {
            input: Price::parse(input).unwrap(),
            output: Some(Price::parse(output).unwrap()),
            cached_input: Price::parse(cached).unwrap(),
            context_tokens: None,
        }
    }

    #[test]
    fn prices_are_read_exactly_from_their_decimal_text() {
        assert_eq!(Price::parse("2.5").unwrap().micros_per_million(), 2_500_000);
        assert_eq!(Price::parse("0.15").unwrap().micros_per_million(), 150_000);
        assert_eq!(Price::parse("0.000001").unwrap().micros_per_million(), 1);
        assert_eq!(Price::parse("10").unwrap().micros_per_million(), 10_000_000);
        assert_eq!(Price::parse("0").unwrap().micros_per_million(), 0);
        assert_eq!(Price::parse("1.500000000").unwrap().micros_per_million(), 1_500_000);
        assert_eq!(Price::parse("1e-6").unwrap().micros_per_million(), 1);
        assert_eq!(Price::parse("2.5E2").unwrap().micros_per_million(), 250_000_000);
        assert_eq!(Price::parse("1234e-3").unwrap().micros_per_million(), 1_234_000);
    }

    #[test]
    fn a_price_with_more_than_six_decimals_or_a_sign_is_refused() {
        assert_eq!(Price::parse("0.0000001"), Err(PriceError::TooManyDecimals));
        assert_eq!(Price::parse("1e-7"), Err(PriceError::TooManyDecimals));
        assert_eq!(Price::parse("2.5e-6"), Err(PriceError::TooManyDecimals));
        assert_eq!(Price::parse("-1"), Err(PriceError::Negative));
        assert_eq!(Price::parse("-0"), Err(PriceError::Negative));
        assert_eq!(Price::parse("1000001"), Err(PriceError::TooLarge));
        assert_eq!(Price::parse("1e400"), Err(PriceError::TooLarge));
        for bad in ["", "+1", "01", "1.", ".5", "1e", "1.2.3", "\"2.5\"", "NaN", "1 2"] {
            assert_eq!(Price::parse(bad), Err(PriceError::NotANumber), "{bad}");
        }
    }

    #[test]
    fn budgets_are_positive_amounts_with_at_most_six_decimals() {
        assert_eq!(Nanos::parse_budget_usd("5"), Ok(Nanos(5_000_000_000)));
        assert_eq!(Nanos::parse_budget_usd("0.01"), Ok(Nanos(10_000_000)));
        assert_eq!(Nanos::parse_budget_usd("0"), Err(PriceError::NotPositive));
        assert_eq!(Nanos::parse_budget_usd("-3"), Err(PriceError::Negative));
        assert_eq!(Nanos::parse_budget_usd("0.0000005"), Err(PriceError::TooManyDecimals));
        assert_eq!(Nanos::parse_budget_usd("1000000001"), Err(PriceError::TooLarge));
    }

    #[test]
    fn amounts_print_as_decimal_usd() {
        assert_eq!(Nanos(5_000_000_000).to_string(), "5");
        assert_eq!(Nanos(123_456).to_string(), "0.000123456");
        assert_eq!(Nanos(1_500_000_000).to_string(), "1.5");
        assert_eq!(Nanos(0).to_string(), "0");
        assert_eq!(Nanos(1_000_000_010).to_string(), "1.00000001");
        assert_eq!(Nanos(1_234_567_891).usd_6_down(), "1.234567");
        assert_eq!(Nanos(1_234_567_891).usd_6_up(), "1.234568");
        assert_eq!(Nanos(1_234_567_000).usd_6_up(), "1.234567");
        assert_eq!(Nanos(999).usd_6_down(), "0");
        assert_eq!(Nanos(10_000_000).usd_6_down(), "0.01");
    }

    #[test]
    fn cost_follows_the_contract_formula_and_rounds_up() {
        // gpt-4o: 2.5 / 10 / 1.25 per 1M. 1000 input of which 200 cached, 500 output:
        // 800 × 2.5 + 200 × 1.25 + 500 × 10 = 7250 USD per 1M = 0.00725 USD.
        let p = prices("2.5", "10", "1.25");
        assert_eq!(cost(&usage(1000, 200, 500), &p), Nanos(7_250_000));
        // One token at 0.000001 per 1M is 1e-12 USD: rounded up to 1e-9.
        let tiny = prices("0.000001", "0", "0.000001");
        assert_eq!(cost(&usage(1, 0, 0), &tiny), Nanos(1));
        assert_eq!(cost(&usage(0, 0, 0), &tiny), Nanos(0));
        // 0.15 per 1M, 3 tokens: 0.45e-6 USD = 450 nanos exactly (a float would not be).
        let mini = prices("0.15", "0.6", "0.075");
        assert_eq!(cost(&usage(3, 0, 0), &mini), Nanos(450));
    }

    #[test]
    fn output_is_total_minus_input_when_that_is_larger() {
        let p = prices("1", "2", "1");
        let reported = Usage {
            input_tokens: 100,
            cached_tokens: 0,
            reported_output_tokens: Some(10),
            total_tokens: Some(150),
        };
        // 100 × 1 + 50 × 2 = 200 per 1M.
        assert_eq!(cost(&reported, &p), Nanos(200_000));
        let no_output = Usage {
            reported_output_tokens: None,
            ..reported
        };
        assert_eq!(cost(&no_output, &p), Nanos(200_000));
        let smaller_total = Usage {
            reported_output_tokens: Some(70),
            ..reported
        };
        assert_eq!(cost(&smaller_total, &p), Nanos(240_000));
    }

    #[test]
    fn cached_tokens_beyond_the_input_count_as_input_only_once() {
        let p = prices("1", "0", "0.5");
        assert_eq!(cost(&usage(10, 50, 0), &p), cost(&usage(10, 10, 0), &p));
    }

    #[test]
    fn model_prices_entries_parse_from_json() {
        let p = Prices::from_json(r#"{"input": 2.5, "output": 10, "context_tokens": 128000}"#).unwrap();
        assert_eq!(p.input, Price(2_500_000));
        assert_eq!(p.cached_input, p.input);
        assert_eq!(p.output, Some(Price(10_000_000)));
        assert_eq!(p.context_tokens, Some(128_000));
        let embedding = Prices::from_json(r#"{"input": 0.02}"#).unwrap();
        assert_eq!(embedding.output, None);
        assert_eq!(
            Prices::from_json(r#"{"input": 0.0000001}"#),
            Err(PricesError::Field("input", PriceError::TooManyDecimals))
        );
        assert_eq!(
            Prices::from_json(r#"{"input": "2.5"}"#),
            Err(PricesError::Field("input", PriceError::NotANumber))
        );
        assert_eq!(Prices::from_json(r#"{"output": 1}"#), Err(PricesError::MissingInput));
        assert_eq!(
            Prices::from_json(r#"{"input": 1, "inptu": 2}"#),
            Err(PricesError::UnknownField)
        );
        assert_eq!(
            Prices::from_json(r#"{"input": 1, "context_tokens": 1.5}"#),
            Err(PricesError::ContextTokens)
        );
        assert_eq!(Prices::from_json("[]"), Err(PricesError::NotAnObject));
    }

    proptest! {
        #[test]
        fn any_six_decimal_price_round_trips(whole in 0u64..1_000_000, frac in 0u64..1_000_000) {
            let text = format!("{whole}.{frac:06}");
            prop_assert_eq!(Price::parse(&text).unwrap().0, whole * 1_000_000 + frac);
            // The same value written with an exponent reads the same.
            let scaled = format!("{}e-6", whole * 1_000_000 + frac);
            prop_assert_eq!(Price::parse(&scaled).unwrap().0, whole * 1_000_000 + frac);
        }

        #[test]
        fn cost_is_the_exact_sum_rounded_up(
            input in 0u64..10_000_000, cached in 0u64..10_000_000, output in 0u64..10_000_000,
            pi in 0u64..100_000_000, po in 0u64..100_000_000, pc in 0u64..100_000_000,
        ) {
            let p = Prices { input: Price(pi), output: Some(Price(po)), cached_input: Price(pc), context_tokens: None };
            let u = usage(input, cached, output);
            let cached = cached.min(input);
            let exact = u128::from(input - cached) * u128::from(pi) + u128::from(cached) * u128::from(pc)
                + u128::from(output) * u128::from(po);
            let got = u128::from(cost(&u, &p).0);
            // Rounded up, by less than one nanodollar.
            prop_assert!(got * 1000 >= exact && got * 1000 < exact + 1000);
        }

        #[test]
        fn costs_are_additive_within_rounding(a in 0u64..1_000_000, b in 0u64..1_000_000, pi in 0u64..100_000_000) {
            let p = Prices { input: Price(pi), output: None, cached_input: Price(pi), context_tokens: None };
            let sum = cost(&usage(a, 0, 0), &p).0 + cost(&usage(b, 0, 0), &p).0;
            let whole = cost(&usage(a + b, 0, 0), &p).0;
            prop_assert!(sum >= whole && sum <= whole + 1);
        }
    }
}
