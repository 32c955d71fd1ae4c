from sdtrt.client.apps.cli import main

raise SystemExit(main())
