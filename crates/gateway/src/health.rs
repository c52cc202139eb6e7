//! `/health` as etcd 3.4 answers it: `{"health":"true"}`, or 503 with
//! `{"health":"false"}` when an alarm is raised, the cluster has no leader,
//! or a read through raft fails within a second. 3.4's body has no reason
//! (its tests match the body exactly), so the reason travels in the
//! `X-Cairn-Health-Reason` header and the log.

use std::time::Duration;

use cairn_api::etcdserverpb::alarm_request::AlarmAction;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_api::etcdserverpb::{AlarmRequest, AlarmType, RangeRequest, StatusRequest};
use http::{Method, Response, StatusCode};

use crate::grpc::Client;
use crate::{Body, text_response};

/// How long the health read may take, as etcd's QGET.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The header that says why a member is unhealthy.
const REASON_HEADER: &str = "x-cairn-health-reason";

pub async fn health(client: &Client, method: Method, query: Option<String>) -> Response<Body> {
    if method != Method::GET {
        let mut response = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "Method Not Allowed\n".to_string(),
        );
        response
            .headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
        return response;
    }
    let query = query.unwrap_or_default();
    let mut excluded = Vec::new();
    let mut serializable = false;
    for (name, value) in query.split('&').filter_map(|p| p.split_once('=')) {
        match name {
            "exclude" => excluded.push(value.to_string()),
            "serializable" => serializable = value == "true",
            _ => {}
        }
    }
    match check(client, &excluded, serializable).await {
        Ok(()) => text_response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            r#"{"health":"true"}"#.to_string(),
        ),
        Err(reason) => {
            tracing::warn!("/health error: {reason} (status code 503)");
            // Go's http.Error, which etcd answers with, ends the body with a
            // newline.
            let mut response = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                "{\"health\":\"false\"}\n".to_string(),
            );
            if let Ok(value) = http::HeaderValue::from_str(&reason) {
                response.headers_mut().insert(REASON_HEADER, value);
            }
            response
        }
    }
}

async fn check(client: &Client, excluded: &[String], serializable: bool) -> Result<(), String> {
    let mut maintenance = MaintenanceClient::new(client.service());
    let alarms = tokio::time::timeout(
        READ_TIMEOUT,
        maintenance.alarm(AlarmRequest {
            action: AlarmAction::Get as i32,
            member_id: 0,
            alarm: AlarmType::None as i32,
        }),
    )
    .await
    .map_err(|_| "ALARM LIST TIMEOUT".to_string())?
    .map_err(|e| format!("ALARM LIST ERROR: {}", e.message()))?;
    for alarm in &alarms.get_ref().alarms {
        let name = AlarmType::try_from(alarm.alarm)
            .map(|a| a.as_str_name())
            .unwrap_or("UNKNOWN");
        if !excluded.iter().any(|e| e == name) {
            return Err(format!("ALARM {name}"));
        }
    }
    if !serializable {
        let status = tokio::time::timeout(READ_TIMEOUT, maintenance.status(StatusRequest {}))
            .await
            .map_err(|_| "RAFT NO LEADER".to_string())?
            .map_err(|e| format!("STATUS ERROR: {}", e.message()))?;
        if status.get_ref().leader == 0 {
            return Err("RAFT NO LEADER".to_string());
        }
    }
    let mut kv = KvClient::new(client.service());
    let read = kv.range(RangeRequest {
        key: b"health".to_vec().into(),
        serializable,
        ..Default::default()
    });
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("QGET ERROR: {}", e.message())),
        Err(_) => Err("QGET TIMEOUT".to_string()),
    }
}
