# ctest helper: runs CMD (one string, split like a shell command line) and
# passes only when it exits with status STATUS (default 1: a violation was
# found) and its output matches REGEX (the violation it must name). With
# STATUS other than 1, REGEX is matched against stdout and stderr together.
separate_arguments(_cmd UNIX_COMMAND "${CMD}")
if(NOT DEFINED STATUS)
  set(STATUS 1)
endif()
execute_process(COMMAND ${_cmd} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
message("${_out}${_err}")
if(NOT _rc STREQUAL "${STATUS}")
  message(FATAL_ERROR "expected exit status ${STATUS}, got '${_rc}'")
endif()
if(STATUS STREQUAL "1")
  set(_text "${_out}")
else()
  set(_text "${_out}${_err}")
endif()
if(NOT _text MATCHES "${REGEX}")
  message(FATAL_ERROR "the output does not say what it must (${REGEX})")
endif()
