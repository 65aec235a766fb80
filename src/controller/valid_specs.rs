//! Which spec generations already passed validation. Under device traffic most reconciles follow
//! a status change (the operator's own writes), not a spec change, and validation is the largest
//! CPU cost of such a reconcile: kube's `validate_cel` regenerates the CRD schema and compiles its
//! CEL rules on every call. A spec is immutable for a generation and the rules are fixed for the
//! life of the process, so a generation that passed once passes again.
//! Failures are not remembered: they are rare and their message is needed each time.

use std::{collections::HashMap, sync::Mutex};

use crate::api::validation::InvalidSpec;

#[derive(Default)]
pub struct ValidSpecs {
    /// Per object UID (a re-created object starts over), the generation that passed.
    passed: Mutex<HashMap<String, i64>>,
}

impl ValidSpecs {
    /// `validate`'s result for this generation of the object, run only when the generation has
    /// not passed before. An object without UID or generation is always validated.
    pub fn check(
        &self,
        uid: Option<&str>,
        generation: Option<i64>,
        validate: impl FnOnce() -> Result<(), InvalidSpec>,
    ) -> Result<(), InvalidSpec> {
        let (Some(uid), Some(generation)) = (uid, generation) else {
            return validate();
        };
        if self.lock().get(uid) == Some(&generation) {
            return Ok(());
        }
        validate()?;
        self.lock().insert(uid.to_string(), generation);
        Ok(())
    }

    /// Forgets a deleted object.
    pub fn forget(&self, uid: Option<&str>) {
        if let Some(uid) = uid {
            self.lock().remove(uid);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.passed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn invalid() -> InvalidSpec {
        InvalidSpec {
            problems: vec!["bad".into()],
        }
    }

    #[test]
    fn a_passed_generation_is_not_validated_again_and_a_failed_one_is() {
        let specs = ValidSpecs::default();
        let runs = Cell::new(0);
        let ok = || {
            runs.set(runs.get() + 1);
            Ok(())
        };
        assert!(specs.check(Some("u1"), Some(1), ok).is_ok());
        assert!(specs.check(Some("u1"), Some(1), ok).is_ok());
        assert_eq!(
            runs.get(),
            1,
            "generation 1 passed once, so it is not run again"
        );
        assert!(specs.check(Some("u1"), Some(2), || Err(invalid())).is_err());
        assert!(
            specs.check(Some("u1"), Some(2), || Err(invalid())).is_err(),
            "failures are not remembered"
        );
        assert!(specs.check(Some("u2"), Some(1), ok).is_ok());
        assert_eq!(runs.get(), 2, "another object is validated on its own");
        specs.forget(Some("u1"));
        assert!(specs.check(Some("u1"), Some(1), ok).is_ok());
        assert_eq!(runs.get(), 3, "a forgotten object is validated again");
        assert!(specs.check(None, Some(1), ok).is_ok());
        assert_eq!(runs.get(), 4, "no UID: always validated");
    }
}
