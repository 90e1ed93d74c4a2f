#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin from Debian (the hospital's PACS in the tests and `make demo-pacs`),
# and dicom3tools, whose dciodvfy checks the Structured Reports privrad stores against the DICOM standard.
# Idempotent: does nothing when all three are there. Starts no service: privrad runs Orthanc as a child process
# with its own folder, loopback only (simulations.orthanc).
set -euo pipefail
have_plugin() { ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* /usr/lib/orthanc/libOrthancDicomWeb.so* >/dev/null 2>&1; }
if { command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } && have_plugin && command -v dciodvfy >/dev/null 2>&1; then
  echo "Orthanc present: $("$(command -v Orthanc || echo /usr/sbin/Orthanc)" --version | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# policy-rc.d may refuse to start the packaged service; privrad never uses it
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb dicom3tools >/dev/null
have_plugin
command -v dciodvfy >/dev/null
echo "installed: $("$(command -v Orthanc || echo /usr/sbin/Orthanc)" --version | head -1)"
