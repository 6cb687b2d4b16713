// What this library was built against. jaxkv/_native/__init__.py reads it
// before registering any kernel and refuses a library built for another
// jaxlib (major.minor): the XLA FFI headers it compiled come from jaxlib.
//
// CMakeLists.txt defines JAXKV_JAXLIB_VERSION from the build's jaxlib.

#ifndef JAXKV_JAXLIB_VERSION
#error "JAXKV_JAXLIB_VERSION must be defined by the build (CMakeLists.txt)"
#endif

extern "C" const char* jaxkv_built_with_jaxlib() { return JAXKV_JAXLIB_VERSION; }
