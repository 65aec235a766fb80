//! The Subscriber reconciler. Receiving is not implemented yet: a valid Subscriber is reported
//! as not Ready, so nobody mistakes it for a working pipeline.

use std::sync::Arc;

use kube::runtime::controller::Action;

use super::{
    Context,
    accepted::{self, StatusCore},
};
use crate::{
    api::{
        Condition, ConditionStatus, Subscriber,
        conditions::types,
        validation::{InvalidSpec, validate_subscriber},
    },
    error::Result,
};

impl accepted::TaskKind for Subscriber {
    fn validate(&self) -> Result<(), InvalidSpec> {
        validate_subscriber(self)
    }

    fn status_core(&self) -> StatusCore {
        let s = self.status.clone().unwrap_or_default();
        StatusCore {
            observed_generation: s.observed_generation,
            conditions: s.conditions,
        }
    }

    fn start(&self, _ctx: &Context) -> Condition {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            "NotImplemented",
            "spec is valid; receiving is not implemented in this version of the operator",
        )
    }

    fn stop(&self, _ctx: &Context) {}
}

pub async fn reconcile(obj: Arc<Subscriber>, ctx: Arc<Context>) -> Result<Action> {
    accepted::reconcile(obj, ctx).await
}
