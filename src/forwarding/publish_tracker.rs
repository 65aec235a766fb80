//! When the broker has a message: an Observer's MQTT sink counts a delivery only once the broker
//! acknowledged the PUBLISH (PUBACK for QoS 1, PUBCOMP for QoS 2), not when it was queued in
//! the client. rumqttc reports packet ids as events, in the order the publishes were queued,
//! so each publish's waiter is matched to the id its PUBLISH went out with; a retransmission
//! after a reconnect (persistent session) goes out with the same id and keeps its waiter.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use rumqttc::{AsyncClient, ClientError, QoS};
use tokio::sync::oneshot;

/// Matches a connection's publishes to the broker's acknowledgements. One per connection, and
/// every PUBLISH on that connection must go through it.
#[derive(Default)]
pub struct PublishTracker {
    /// Serialises queueing, so waiters line up in the order the client sends.
    queueing: tokio::sync::Mutex<()>,
    state: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    /// Queued, not yet sent (no packet id yet).
    queued: VecDeque<oneshot::Sender<()>>,
    /// Sent with a packet id, waiting for the broker.
    in_flight: HashMap<u16, oneshot::Sender<()>>,
}

impl PublishTracker {
    fn state(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a publish; the receiver resolves when the broker acknowledged it (QoS 0: when it
    /// was sent). Dropped unresolved if the connection state is lost.
    pub async fn publish(
        &self,
        client: &AsyncClient,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<oneshot::Receiver<()>, ClientError> {
        let _order = self.queueing.lock().await;
        let (tx, rx) = oneshot::channel();
        self.state().queued.push_back(tx);
        if let Err(e) = client.publish(topic, qos, retain, payload).await {
            self.state().queued.pop_back();
            return Err(e);
        }
        Ok(rx)
    }

    /// A PUBLISH went out as `pkid`.
    pub fn sent(&self, pkid: u16) {
        let mut state = self.state();
        if pkid != 0 && state.in_flight.contains_key(&pkid) {
            // A retransmission: its waiter is already matched.
            return;
        }
        let Some(waiter) = state.queued.pop_front() else {
            return;
        };
        if pkid == 0 {
            let _ = waiter.send(());
        } else {
            state.in_flight.insert(pkid, waiter);
        }
    }

    /// The broker acknowledged `pkid`.
    pub fn acknowledged(&self, pkid: u16) {
        if let Some(waiter) = self.state().in_flight.remove(&pkid) {
            let _ = waiter.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> AsyncClient {
        let (client, eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "localhost", 1883), 16);
        // Keep the request channel open for the test's lifetime.
        std::mem::forget(eventloop);
        client
    }

    #[tokio::test]
    async fn a_publish_is_delivered_when_the_broker_acknowledged_it_not_before() {
        let tracker = PublishTracker::default();
        let c = client();
        let mut first = tracker
            .publish(&c, "a".into(), QoS::AtLeastOnce, false, vec![])
            .await
            .unwrap();
        let mut second = tracker
            .publish(&c, "b".into(), QoS::AtLeastOnce, false, vec![])
            .await
            .unwrap();
        tracker.sent(1);
        tracker.sent(2);
        assert!(first.try_recv().is_err(), "sent is not acknowledged");
        // Retransmitted after a reconnect: same ids, same waiters.
        tracker.sent(1);
        tracker.acknowledged(2);
        assert!(second.try_recv().is_ok());
        assert!(first.try_recv().is_err());
        tracker.acknowledged(1);
        assert!(first.try_recv().is_ok());
    }

    #[tokio::test]
    async fn qos_0_counts_as_delivered_once_sent() {
        let tracker = PublishTracker::default();
        let c = client();
        let mut rx = tracker
            .publish(&c, "a".into(), QoS::AtMostOnce, false, vec![])
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());
        tracker.sent(0);
        assert!(rx.try_recv().is_ok());
    }
}
