# CDash submission (ctest -D Nightly / -D Experimental, or the ctest -S scripts in ci/).
set(CTEST_PROJECT_NAME "opensci-compat")
set(CTEST_NIGHTLY_START_TIME "01:00:00 UTC")
set(CTEST_SUBMIT_URL "$ENV{OPENSCI_CDASH_SUBMIT_URL}")
set(CTEST_DROP_SITE_CDASH TRUE)
