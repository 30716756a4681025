"""The TLS listener against Mozilla's "intermediate" profile, as sslyze checks
it (README, "TLS"): versions, cipher suites, curves, certificate, known
vulnerabilities. Any deviation fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tls import public_style_pair, tls_relay


def test_the_tls_listener_is_mozilla_intermediate_per_sslyze(ws_origin, tmp_path):
    from sslyze import (CertificateInfoExtraArgument, Scanner, ScanCommandsExtraArguments, ServerNetworkLocation,
                        ServerScanRequest, ServerScanStatusEnum)
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        MozillaTlsConfiguration, ServerNotCompliantWithTlsConfiguration, TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )

    # a certificate as a public CA issues it: ECDSA P-256, 90 days (the profile allows 366)
    pair = public_style_pair(tmp_path, "localhost")
    with tls_relay(ws_origin.addr, pair, workers=1) as r:
        request = ServerScanRequest(
            server_location=ServerNetworkLocation("localhost", r.tls_port, ip_address="127.0.0.1"),
            scan_commands_extra_arguments=ScanCommandsExtraArguments(
                certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(tmp_path / "ca.pem"))),
        )
        scanner = Scanner()
        scanner.queue_scans([request])
        result = next(iter(scanner.get_results()))
        assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
        try:
            check_server_against_tls_configuration(
                result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE))
        except ServerNotCompliantWithTlsConfiguration as e:
            dep = result.scan_result.certificate_info.result.certificate_deployments[0]
            pytest.fail(f"not Mozilla intermediate: {e.issues} " + repr([(v.trust_store.name, v.validation_error) for v in dep.path_validation_results if v.trust_store.name.startswith("Custom") or "ca.pem" in str(v.trust_store.path)]))
        curves = result.scan_result.elliptic_curves.result
        assert {c.name for c in curves.supported_curves} == {"X25519", "secp256r1", "secp384r1"}
        assert "Traceback" not in r.text()
