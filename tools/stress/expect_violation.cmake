# ctest helper: runs CMD (one string, split like a shell command line) and
# passes only when it exits with status 1 (a violation was found) and its
# output matches REGEX (the violation it must name).
separate_arguments(_cmd UNIX_COMMAND "${CMD}")
execute_process(COMMAND ${_cmd} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
message("${_out}${_err}")
if(NOT _rc STREQUAL "1")
  message(FATAL_ERROR "expected exit status 1 (a violation), got '${_rc}'")
endif()
if(NOT _out MATCHES "${REGEX}")
  message(FATAL_ERROR "the output does not name the expected violation (${REGEX})")
endif()
