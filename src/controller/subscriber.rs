//! The Subscriber reconciler. Receiving itself is not implemented yet: a valid Subscriber is
//! reported as accepted but not Ready, so nobody mistakes it for a working pipeline.

use std::sync::Arc;

use kube::runtime::controller::Action;

use super::{Context, accepted};
use crate::{
    api::{
        Condition, ConditionStatus, Subscriber, SubscriberStatus,
        conditions::{Conditions, types},
        validation::{InvalidSpec, validate_subscriber},
    },
    error::Result,
};

impl accepted::TaskKind for Subscriber {
    type Status = SubscriberStatus;

    fn validate(&self) -> Result<(), InvalidSpec> {
        validate_subscriber(self)
    }

    fn current_status(&self) -> SubscriberStatus {
        self.status.clone().unwrap_or_default()
    }

    fn conditions_mut(status: &mut SubscriberStatus) -> &mut Conditions {
        &mut status.conditions
    }

    fn set_observed_generation(status: &mut SubscriberStatus, generation: Option<i64>) {
        status.observed_generation = generation;
    }

    fn ready_condition(&self) -> Condition {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            "NotImplemented",
            "spec is valid; receiving is not implemented in this version of the operator",
        )
    }
}

pub async fn reconcile(obj: Arc<Subscriber>, ctx: Arc<Context>) -> Result<Action> {
    accepted::reconcile(obj, ctx).await
}
