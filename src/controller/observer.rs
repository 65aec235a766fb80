//! The Observer reconciler. Forwarding itself is not implemented yet: a valid Observer is
//! reported as accepted but not Ready, so nobody mistakes it for a working pipeline.

use std::sync::Arc;

use kube::runtime::controller::Action;

use super::{Context, accepted};
use crate::{
    api::{
        Condition, ConditionStatus, Observer, ObserverStatus,
        conditions::{Conditions, types},
        validation::{InvalidSpec, validate_observer},
    },
    error::Result,
};

impl accepted::TaskKind for Observer {
    type Status = ObserverStatus;

    fn validate(&self) -> Result<(), InvalidSpec> {
        validate_observer(self)
    }

    fn current_status(&self) -> ObserverStatus {
        self.status.clone().unwrap_or_default()
    }

    fn conditions_mut(status: &mut ObserverStatus) -> &mut Conditions {
        &mut status.conditions
    }

    fn set_observed_generation(status: &mut ObserverStatus, generation: Option<i64>) {
        status.observed_generation = generation;
    }

    fn ready_condition(&self) -> Condition {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            "NotImplemented",
            "spec is valid; forwarding is not implemented in this version of the operator",
        )
    }
}

pub async fn reconcile(obj: Arc<Observer>, ctx: Arc<Context>) -> Result<Action> {
    accepted::reconcile(obj, ctx).await
}
