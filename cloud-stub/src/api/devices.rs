//! Read-only views of gateways and devices, served from the in-memory registry.

use super::error::{ApiError, PathParams};
use super::AppState;
use crate::registry::{self, Device, Registry};
use axum::extract::State;
use axum::Json;
use gatewayd_protocol::{DeviceId, ErrorCode, GatewayId, MethodInfo};
use serde::Serialize;

/// One gateway as `GET /api/v1/gateways` lists it.
#[derive(Debug, Serialize)]
pub struct GatewayView {
    pub id: GatewayId,
    pub online: bool,
    pub boot_id: String,
    pub software: String,
    pub last_seen_ms: u64,
    /// The identity of its store as it last reported it; empty: unknown.
    pub store_id: String,
    /// Why it cannot commit to its store, while it says so: it is sent no messages.
    pub store_error: Option<String>,
    pub devices: Vec<DeviceId>,
}

/// One device as `GET /api/v1/devices[/{id}]` shows it.
#[derive(Debug, Serialize, PartialEq)]
pub struct DeviceView {
    pub id: DeviceId,
    pub gateway: GatewayId,
    pub kind: String,
    /// Reachable now: gateway online and device online.
    pub online: bool,
    pub gateway_online: bool,
    pub device_online: bool,
    /// Why it is unreachable (gateway offline first, then the device's own reason).
    pub offline_reason: Option<String>,
    pub methods: Vec<MethodInfo>,
    pub twin_properties: Vec<String>,
    pub commands: Vec<String>,
    pub last_seen_ms: u64,
}

/// `GET /api/v1/gateways`, sorted by id.
pub async fn list_gateways(State(app): State<AppState>) -> Json<Vec<GatewayView>> {
    let reg = registry::lock(&app.registry);
    let views = reg
        .gateways()
        .map(|(id, gw)| GatewayView {
            id: id.clone(),
            online: gw.online,
            boot_id: gw.boot_id.clone(),
            software: gw.software.clone(),
            last_seen_ms: gw.last_seen_ms,
            store_id: gw.store_id.clone(),
            store_error: gw.store_error.clone(),
            devices: gw.devices.iter().cloned().collect(),
        })
        .collect();
    Json(views)
}

/// `GET /api/v1/devices`, sorted by id.
pub async fn list_devices(State(app): State<AppState>) -> Json<Vec<DeviceView>> {
    let reg = registry::lock(&app.registry);
    Json(reg.devices().map(|(_, d)| device_view(&reg, d)).collect())
}

/// `GET /api/v1/devices/{id}`; unknown: 404 `device_not_found`.
pub async fn get_device(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let reg = registry::lock(&app.registry);
    DeviceId::new(&id)
        .ok()
        .and_then(|id| reg.device(&id))
        .map(|d| Json(device_view(&reg, d)))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::DeviceNotFound,
                format!("no gateway declares device {id}"),
            )
        })
}

fn device_view(reg: &Registry, dev: &Device) -> DeviceView {
    let gateway_online = reg.gateway_online(&dev.gateway);
    let offline_reason = if !gateway_online {
        Some(format!("gateway {} is offline", dev.gateway))
    } else if !dev.online {
        Some(
            dev.reason
                .clone()
                .unwrap_or_else(|| "gateway reports the device offline".into()),
        )
    } else {
        None
    };
    DeviceView {
        id: dev.info.id.clone(),
        gateway: dev.gateway.clone(),
        kind: dev.info.kind.clone(),
        online: gateway_online && dev.online,
        gateway_online,
        device_online: dev.online,
        offline_reason,
        methods: dev.info.methods.clone(),
        twin_properties: dev.info.twin_properties.clone(),
        commands: dev.info.commands.clone(),
        last_seen_ms: dev.last_seen_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeviceRecord, GatewayRecord};
    use serde_json::json;

    fn registry(gateway_online: bool, device_online: bool) -> Registry {
        let gw = GatewayId::new("g1").unwrap();
        let gateway = GatewayRecord {
            id: gw.clone(),
            online: true,
            boot_id: "b".into(),
            software: "s".into(),
            last_seen_ms: 1,
            store_id: "st-1".into(),
        };
        let device = DeviceRecord {
            gateway: gw.clone(),
            info: serde_json::from_value(json!({"id": "agv-1", "kind": "http"})).unwrap(),
            online: device_online,
            since_ms: 1,
            reason: None,
            last_seen_ms: 2,
        };
        let mut reg = Registry::from_records(vec![gateway], vec![device]);
        let state = json!({"online": gateway_online});
        reg.apply_state(&gw, &serde_json::from_value(state).unwrap(), 3);
        reg
    }

    fn view(reg: &Registry) -> serde_json::Value {
        let dev = reg.device(&DeviceId::new("agv-1").unwrap()).unwrap();
        serde_json::to_value(device_view(reg, dev)).unwrap()
    }

    #[test]
    fn online_needs_both_gateway_and_device() {
        let v = view(&registry(true, true));
        assert_eq!(v["online"], true);
        assert_eq!(v["offline_reason"], serde_json::Value::Null);
        assert_eq!(v["methods"], json!([]));
        let v = view(&registry(false, true));
        assert_eq!(v["online"], false);
        assert_eq!(v["device_online"], true);
        assert_eq!(v["offline_reason"], "gateway g1 is offline");
        let v = view(&registry(true, false));
        assert_eq!(v["online"], false);
        assert_eq!(v["gateway_online"], true);
    }
}
