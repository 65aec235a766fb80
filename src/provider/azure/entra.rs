//! Microsoft Entra workload identity for the hub, the alternative to a SAS policy: the operator's
//! service-account token (projected by the AKS workload-identity webhook into
//! `AZURE_FEDERATED_TOKEN_FILE`) is exchanged at Entra (`AZURE_AUTHORITY_HOST`, tenant
//! `AZURE_TENANT_ID`, app `AZURE_CLIENT_ID`) for a bearer token with scope
//! [`IOT_HUB_SCOPE`], which every request to the hub carries as `Authorization: Bearer ...`.
//!
//! Both halves are the Azure SDK's own: `azure_identity`'s `WorkloadIdentityCredential` (which
//! caches the token and re-reads the federated token file every ten minutes, as the kubelet
//! rotates it) and `azure_core`'s `BearerTokenAuthorizationPolicy` (which keeps the token until
//! five minutes before it expires and then fetches a new one, so a token is fetched once per
//! lifetime, not per request; a 401 from the hub drops it). Both refuse plain HTTP: the token
//! endpoint and the hub must be `https` (the policy fails a request to an `http` endpoint rather
//! than send a bearer token in the clear). The token exchange goes over the operator's own
//! reqwest transport, which trusts the system roots (or `SSL_CERT_FILE`).

use azure_core::http::{ClientOptions, Transport, policies::auth::BearerTokenAuthorizationPolicy};
use azure_identity::{
    ClientAssertionCredentialOptions, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};

/// The scope of a token for the IoT Hub service API (any hub: the role assignment decides which).
pub const IOT_HUB_SCOPE: &str = "https://iothubs.azure.net/.default";

/// The pipeline policy that authenticates every request to the hub with a workload-identity token.
/// Fails when the webhook's environment is missing or the federated token file cannot be read
/// (the message names the variable or the file, never a token).
pub(super) fn bearer_policy(
    transport: Transport,
) -> Result<BearerTokenAuthorizationPolicy, String> {
    let options = WorkloadIdentityCredentialOptions {
        credential_options: ClientAssertionCredentialOptions {
            client_options: ClientOptions {
                transport: Some(transport),
                ..ClientOptions::default()
            },
        },
        ..WorkloadIdentityCredentialOptions::default()
    };
    let credential = WorkloadIdentityCredential::new(Some(options))
        .map_err(|e| format!("Azure workload identity: {e}"))?;
    Ok(BearerTokenAuthorizationPolicy::new(
        credential,
        [IOT_HUB_SCOPE],
    ))
}
