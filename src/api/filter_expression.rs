//! An Observer's `filter.expression`: a CEL boolean over the update (`state`), the previous
//! update of the same Thing (`previous`) and what was last forwarded for it (`last`). Compiled
//! once per spec; a compile error is `InvalidSpec` with its position. Pure.
//!
//! Cost is bounded by shape, not by a meter: the source is at most [`MAX_SOURCE`] characters,
//! the expression tree at most [`MAX_DEPTH`] deep (evaluation recurses over it), and
//! comprehension macros (`all`, `exists`, `map`, `filter`) may not nest, so one evaluation is
//! linear in the size of the documents it reads. The parser recurses over the source's nesting
//! before any of that can be checked, so it runs on a thread of its own with a large stack: a
//! hostile source must never overflow the stack of the operator's workers.

use cel::{
    Context, Program, Value as CelValue,
    common::ast::{EntryExpr, Expr, IdedExpr},
};
use serde_json::Value;

/// Longest expression accepted (the CRD schema says the same).
pub const MAX_SOURCE: usize = 1024;
/// Deepest expression tree accepted.
pub const MAX_DEPTH: usize = 48;
/// The parser's stack: enough for any source of [`MAX_SOURCE`] characters.
const PARSER_STACK: usize = 64 * 1024 * 1024;

/// Why an expression is refused. The message names the position, never a document's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionError {
    #[error("filter.expression is longer than {MAX_SOURCE} characters")]
    TooLong,
    #[error("filter.expression does not compile: {0}")]
    Compile(String),
    #[error(
        "filter.expression nests comprehensions (all/exists/map/filter inside another): its cost would grow with the square of the document"
    )]
    NestedComprehension,
    #[error("filter.expression nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

thread_local! {
    /// CEL's standard functions, registered once per thread: `Context::default()` boxes some
    /// forty functions into a fresh registry, which done per evaluation was most of a filter's
    /// cost. Each evaluation gets an inner scope holding only its variables.
    static STANDARD_FUNCTIONS: Context<'static> = Context::default();
}

/// A compiled `filter.expression`.
#[derive(Debug)]
pub struct FilterExpression {
    program: Program,
}

impl FilterExpression {
    pub fn compile(source: &str) -> Result<Self, ExpressionError> {
        if source.chars().count() > MAX_SOURCE {
            return Err(ExpressionError::TooLong);
        }
        let source = source.to_string();
        let parse = move || -> Result<Program, ExpressionError> {
            let program = Program::compile(&source)
                .map_err(|e| ExpressionError::Compile(one_line(&e.to_string())))?;
            let shape = shape(program.expression());
            if shape.depth > MAX_DEPTH {
                return Err(ExpressionError::TooDeep);
            }
            if shape.comprehensions > 1 {
                return Err(ExpressionError::NestedComprehension);
            }
            Ok(program)
        };
        let parser = std::thread::Builder::new()
            .name("cel-parser".into())
            .stack_size(PARSER_STACK)
            .spawn(parse)
            .map_err(|e| ExpressionError::Compile(format!("no parser thread: {e}")))?;
        // A panic in the parser is the source's fault, not the operator's: a refusal.
        let program = parser
            .join()
            .map_err(|_| ExpressionError::Compile("the parser gave up on this source".into()))??;
        Ok(Self { program })
    }

    /// Whether the update passes. `Err` says why the expression could not be evaluated (a
    /// missing field, a type mismatch, a result that is not a boolean): the update does not
    /// pass, and the Observer reports the reason.
    pub fn matches(&self, state: &Value, previous: &Value, last: &Value) -> Result<bool, String> {
        STANDARD_FUNCTIONS.with(|root| {
            let mut context = root.new_inner_scope();
            for (name, value) in [("state", state), ("previous", previous), ("last", last)] {
                let value = cel::to_value(value).map_err(|e| format!("{name}: {e}"))?;
                context.add_variable_from_value(name, value);
            }
            self.evaluate(&context)
        })
    }

    fn evaluate(&self, context: &Context) -> Result<bool, String> {
        match self.program.execute(context) {
            Ok(CelValue::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "filter.expression gave {:?}, not a boolean",
                other.type_of()
            )),
            Err(e) => Err(format!("filter.expression: {e}")),
        }
    }
}

/// The parser's message, with its source snippet folded onto one line (status fields and
/// Events are read one line at a time).
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How deep an expression tree is, and how deeply comprehensions nest in it (0: none).
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    depth: usize,
    comprehensions: usize,
}

fn shape(expr: &IdedExpr) -> Shape {
    let (children, comprehension): (Vec<&IdedExpr>, bool) = match &expr.expr {
        Expr::Call(call) => (
            call.target
                .as_deref()
                .into_iter()
                .chain(call.args.iter())
                .collect(),
            false,
        ),
        Expr::Comprehension(c) => (
            vec![
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ],
            true,
        ),
        Expr::List(list) => (list.elements.iter().collect(), false),
        Expr::Map(map) => (entry_values(&map.entries), false),
        Expr::Struct(s) => (entry_values(&s.entries), false),
        Expr::Select(select) => (vec![select.operand.as_ref()], false),
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => (Vec::new(), false),
    };
    let inner = children
        .into_iter()
        .map(shape)
        .fold(Shape::default(), |a, b| Shape {
            depth: a.depth.max(b.depth),
            comprehensions: a.comprehensions.max(b.comprehensions),
        });
    Shape {
        depth: inner.depth + 1,
        comprehensions: inner.comprehensions + usize::from(comprehension),
    }
}

fn entry_values(entries: &[cel::common::ast::IdedEntryExpr]) -> Vec<&IdedExpr> {
    entries
        .iter()
        .flat_map(|e| match &e.expr {
            EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
            EntryExpr::StructField(f) => vec![&f.value],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn passes(source: &str, state: Value, previous: Value, last: Value) -> Result<bool, String> {
        FilterExpression::compile(source)
            .expect("compiles")
            .matches(&state, &previous, &last)
    }

    #[test]
    fn the_event_models_examples_are_one_line_each() {
        let too_high = "state.temp > 30.0";
        let too_low = "state.temp < 5";
        let moved_since_forwarded =
            "!has(last.temp) || state.temp - last.temp > 2.0 || last.temp - state.temp > 2.0";
        let table = [
            (too_high, json!({"temp": 31.5}), json!({}), true),
            (too_high, json!({"temp": 30}), json!({}), false),
            (too_low, json!({"temp": 4.5}), json!({}), true),
            (too_low, json!({"temp": 5}), json!({}), false),
            (
                moved_since_forwarded,
                json!({"temp": 20.0}),
                json!({}),
                true,
            ),
            (
                moved_since_forwarded,
                json!({"temp": 21.5}),
                json!({"temp": 20.0}),
                false,
            ),
            (
                moved_since_forwarded,
                json!({"temp": 17.5}),
                json!({"temp": 20.0}),
                true,
            ),
        ];
        for (source, state, last, expected) in table {
            assert_eq!(
                passes(source, state.clone(), json!({}), last.clone()),
                Ok(expected),
                "{source} with state {state} and last {last}"
            );
        }
    }

    #[test]
    fn previous_is_the_update_before_this_one() {
        let rising = "has(previous.temp) && state.temp > previous.temp";
        assert_eq!(
            passes(rising, json!({"temp": 3}), json!({"temp": 2}), json!({})),
            Ok(true)
        );
        assert_eq!(
            passes(rising, json!({"temp": 3}), json!({}), json!({})),
            Ok(false)
        );
    }

    #[test]
    fn evaluation_problems_are_errors_not_passes() {
        let e = passes("state.temp > 30", json!({}), json!({}), json!({})).unwrap_err();
        assert!(e.contains("filter.expression"), "{e}");
        let e = passes("state.temp", json!({"temp": 1}), json!({}), json!({})).unwrap_err();
        assert!(e.contains("not a boolean"), "{e}");
    }

    #[test]
    fn bad_sources_are_refused_with_their_position() {
        match FilterExpression::compile("state.temp >") {
            Err(ExpressionError::Compile(m)) => {
                assert!(m.contains(":1:"), "{m}");
                assert!(!m.contains('\n'), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            FilterExpression::compile(&"1 + ".repeat(300)).unwrap_err(),
            ExpressionError::TooLong
        );
        // Nesting the parser would recurse into (on a worker's stack it would overflow it).
        for deep in [
            format!("{}true{}", "(".repeat(500), ")".repeat(500)),
            format!("{}1", "1 + ".repeat(250)),
            format!("{}1{}", "[".repeat(500), "]".repeat(500)),
        ] {
            assert!(
                FilterExpression::compile(&deep).is_err(),
                "{}...",
                &deep[..20]
            );
        }
        // The parser folds runs of unary operators: these compile, shallow, and do not crash.
        for folded in [
            format!("{}true", "!".repeat(1000)),
            format!("{}1", "-".repeat(1000)),
        ] {
            let _ = FilterExpression::compile(&folded);
        }
        assert_eq!(
            FilterExpression::compile("state.a.all(x, state.b.exists(y, x == y))").unwrap_err(),
            ExpressionError::NestedComprehension
        );
        assert!(
            FilterExpression::compile("state.a.all(x, x > 1) && state.b.exists(y, y == 2)").is_ok()
        );
    }
}
