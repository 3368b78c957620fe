# Installing Loom for services built outside this tree (component loom_dev):
#
#   cmake --install build --prefix /opt/loom --component loom_dev
#
# gives
#   lib/libloom.a                    the engine (Loom::engine): loom_main(), consumers, ops...
#   lib/libloom_services*.a etc.     Loom's messages and registry services (Loom::services)
#   lib/libloom_testkit.a            the test kit (Loom::testkit, loom/testkit.h)
#   include/loom/*.h                 the public headers: those loom/loom.h lists, and
#                                    services.h, testkit.h, version.h
#   lib/pkgconfig/loom.pc, loom-services.pc, loom-testkit.pc
#   lib/cmake/Loom/                  find_package(Loom) and loom_add_migrations()
#
# The libraries are static: a service binary carries the engine it was built
# with. Their dependencies (libpq, librdkafka, jansson, libuv, http_parser)
# are found again by find_package(Loom) and named in the pkg-config files.
# libloom-client keeps its own component, loom_client (engine/client/).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(LOOM_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/Loom")

# The headers a service may include: exactly those loom/loom.h lists, and
# the headers of the built-in services and of the test kit.
file(STRINGS "${PROJECT_SOURCE_DIR}/engine/include/loom/loom.h" loom_umbrella
     REGEX "^#include \"loom/[a-z0-9_]+\\.h\"")
set(LOOM_PUBLIC_HEADERS "${PROJECT_SOURCE_DIR}/engine/include/loom/loom.h")
foreach(line IN LISTS loom_umbrella)
  string(REGEX REPLACE "^#include \"loom/([a-z0-9_]+\\.h)\".*" "\\1" h "${line}")
  if(h STREQUAL "version.h")
    continue() # generated, installed below
  endif()
  list(APPEND LOOM_PUBLIC_HEADERS "${PROJECT_SOURCE_DIR}/engine/include/loom/${h}")
endforeach()
list(APPEND LOOM_PUBLIC_HEADERS
  "${PROJECT_SOURCE_DIR}/engine/include/loom/testkit.h"
  "${PROJECT_BINARY_DIR}/engine/include/loom/version.h"
  "${PROJECT_SOURCE_DIR}/consumers/loom/services.h")
install(FILES ${LOOM_PUBLIC_HEADERS}
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/loom COMPONENT loom_dev)

# In the build tree the targets see the source folders; installed, only
# include/.
set_target_properties(loom_engine PROPERTIES OUTPUT_NAME loom EXPORT_NAME engine)
set_property(TARGET loom_engine PROPERTY INTERFACE_INCLUDE_DIRECTORIES
  "$<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/engine/include;${PROJECT_BINARY_DIR}/engine/include>"
  "$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>")
# libuv's and libpq's headers need POSIX declarations that a strict -std=c11
# hides: programs include Loom's headers as the engine is built, with
# _GNU_SOURCE.
set_property(TARGET loom_engine APPEND PROPERTY INTERFACE_COMPILE_DEFINITIONS _GNU_SOURCE)
set_property(TARGET loom_ops PROPERTY INTERFACE_INCLUDE_DIRECTORIES
  "$<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/ops>" "$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>")
set_property(TARGET loom_api PROPERTY INTERFACE_INCLUDE_DIRECTORIES
  "$<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/api>" "$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>")
set_property(TARGET loom_consumers PROPERTY INTERFACE_INCLUDE_DIRECTORIES
  "$<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/consumers>" "$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>")
set_target_properties(loom_consumers PROPERTIES OUTPUT_NAME loom_services EXPORT_NAME services)
set_target_properties(loom_ops PROPERTIES OUTPUT_NAME loom_services_ops EXPORT_NAME services_ops)
set_target_properties(loom_api PROPERTIES OUTPUT_NAME loom_services_api EXPORT_NAME services_api)
set_target_properties(loom_migrations PROPERTIES OUTPUT_NAME loom_services_migrations
                                                 EXPORT_NAME services_migrations)
set_target_properties(loom_registry_model PROPERTIES OUTPUT_NAME loom_services_registry_model
                                                     EXPORT_NAME services_registry_model)
set_target_properties(loom_warnings PROPERTIES EXPORT_NAME warnings)

# The gateway's http_parser has no pkg-config file: an imported target the
# package recreates (LoomConfig.cmake.in).
install(TARGETS loom_engine loom_testkit loom_consumers loom_ops loom_api loom_migrations
                loom_registry_model loom_warnings
        EXPORT LoomTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT loom_dev)
install(EXPORT LoomTargets NAMESPACE Loom:: DESTINATION ${LOOM_INSTALL_CMAKEDIR}
        COMPONENT loom_dev)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/LoomConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/LoomConfig.cmake INSTALL_DESTINATION ${LOOM_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/LoomConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/cmake/LoomConfig.cmake
              ${PROJECT_BINARY_DIR}/cmake/LoomConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/LoomMigrations.cmake
        DESTINATION ${LOOM_INSTALL_CMAKEDIR} COMPONENT loom_dev)

# pkg-config, relocatable like loom-client.pc.
file(RELATIVE_PATH LOOM_PC_TO_PREFIX "/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/")
string(REGEX REPLACE "/$" "" LOOM_PC_TO_PREFIX "${LOOM_PC_TO_PREFIX}")
get_filename_component(LOOM_HTTP_PARSER_LIBDIR "${HTTP_PARSER_LIBRARY}" DIRECTORY)
foreach(pc loom loom-services loom-testkit)
  configure_file(${PROJECT_SOURCE_DIR}/cmake/${pc}.pc.in ${PROJECT_BINARY_DIR}/cmake/${pc}.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/cmake/${pc}.pc
          DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT loom_dev)
endforeach()
