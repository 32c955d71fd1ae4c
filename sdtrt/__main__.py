from sdtrt.app.cli import main

raise SystemExit(main())
