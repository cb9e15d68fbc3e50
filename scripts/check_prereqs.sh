#!/usr/bin/env bash
# Check the system prerequisites of the pipeline before anything is installed or built, so a
# missing tool is one line saying what to install, not a 300-line CMake or Spark log.
#
# Usage: scripts/check_prereqs.sh runtime   Python 3.11 and a JDK Spark 3.5 supports
#        scripts/check_prereqs.sh build     what building Horovod needs: cmake 3.x, a C++17
#                                           compiler, make, the Python headers
# Environment: PYTHON (python3.11), JAVA_HOME (as Spark uses it), CMAKE (cmake 3.x binary),
#              CXX (the C++ compiler; default g++)
set -uo pipefail

MODE="${1:-runtime}"
PYTHON="${PYTHON:-python3.11}"
die() { echo "check_prereqs: ERROR: $*" >&2; exit 1; }

check_runtime() {
  command -v "$PYTHON" >/dev/null 2>&1 \
    || die "$PYTHON not found. Install Python 3.11 with venv and headers (apt-get install python3.11 python3.11-venv python3.11-dev) or set PYTHON=/path/to/python3.11."
  "$PYTHON" -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); the pinned stack needs Python 3.11."
  local java="java"
  [ -n "${JAVA_HOME:-}" ] && java="$JAVA_HOME/bin/java"
  command -v "$java" >/dev/null 2>&1 \
    || die "java not found${JAVA_HOME:+ at $java (JAVA_HOME=$JAVA_HOME)}; Spark needs a JDK 17. Install it: apt-get install openjdk-17-jdk-headless."
  local major
  major=$("$java" -version 2>&1 | head -1 | sed -E 's/.*version "(1\.)?([0-9]+).*/\2/')
  case "$major" in
    8|11|17) ;;
    *) die "java $major found ($java); Spark 3.5 runs on Java 8, 11 or 17. Install openjdk-17-jdk-headless and point JAVA_HOME at it." ;;
  esac
}

check_build() {
  local cmake="${CMAKE:-}"
  if [ -z "$cmake" ]; then
    # Prefer the system cmake: the one pip installs (4.x) rejects gloo's cmake_minimum_required.
    if [ -x /usr/bin/cmake ]; then cmake=/usr/bin/cmake; else cmake=$(command -v cmake || true); fi
  fi
  [ -n "$cmake" ] && command -v "$cmake" >/dev/null 2>&1 \
    || die "cmake not found${CMAKE:+ at $CMAKE}. Install it: apt-get install cmake (a 3.x version)."
  local cmake_major
  cmake_major=$("$cmake" --version 2>/dev/null | head -1 | sed -E 's/[^0-9]*([0-9]+)\..*/\1/')
  [ -n "$cmake_major" ] && [ "$cmake_major" -ge 3 ] && [ "$cmake_major" -lt 4 ] \
    || die "$cmake is version ${cmake_major:-unknown}; Horovod's bundled gloo needs cmake 3.x. Install it: apt-get install cmake, or set CMAKE=/path/to/cmake3."
  local cxx="${CXX:-g++}"
  command -v "$cxx" >/dev/null 2>&1 \
    || die "C++ compiler '$cxx' not found. Install one with C++17 support: apt-get install g++ (or set CXX)."
  command -v make >/dev/null 2>&1 || die "make not found. Install it: apt-get install make."
  "$PYTHON" -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" 2>/dev/null \
    || die "Python headers (Python.h) for $PYTHON are missing. Install them: apt-get install python3.11-dev."
  echo "$cmake"
}

case "$MODE" in
  runtime) check_runtime ;;
  build) check_build ;;
  *) die "unknown mode '$MODE' (runtime or build)" ;;
esac
